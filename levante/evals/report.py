"""What a run leaves behind: results.json (every item's prompt, answer and scores), report.md (the
model card's table with our numbers next to the published ones) and report.png (the same as bars)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from levante.evals.runner import SuiteResult
from levante.evals.stats import RESAMPLES, SEED, Interval
from levante.evals.uncertainty import intervals, summary_of

CARD_SOURCE = "Mistral-Small-3.2-24B-Instruct-2506 model card"


Row = tuple[str, str, Interval, float | None]


def rows(results: list[SuiteResult]) -> list[Row]:
    """(suite, metric, ours with its interval, card): the card's metrics first, in its order, then
    our extras."""
    out = []
    for r in results:
        found = intervals(summary_of(r.name), r.records, r.metrics) if r.records else {}
        names = [m for m in r.card if m in r.metrics] + [m for m in r.metrics if m not in r.card]
        out += [(r.name, m, found[m], r.card.get(m)) for m in names]
    return out


def _context(run: dict[str, Any]) -> str:
    context = run.get("context") or {}
    if context.get("length") is None:
        return "Context: not reported by the endpoint (--context-length gives it); max_tokens as suites ask."
    line = (
        f"Context: {context['length']} tokens ({context['source']}); max_tokens cut to what a prompt leaves."
    )
    if context.get("uncounted"):
        line += f" Prompts could not be counted, so nothing was cut: {context['uncounted']}"
    return line


def markdown(results: list[SuiteResult], run: dict[str, Any], table: list[Row]) -> str:
    lines = [
        f"# levante eval: {run['model']}",
        "",
        f"Endpoint: {run['endpoint']} · {'bundled samples' if run['sample'] else 'full datasets'}"
        + (f" · first {run['limit']} items per suite" if run["limit"] else ""),
        "",
        _context(run),
        "",
        "| suite | metric | ours | ± SE | 95% CI | card | n |\n|---|---|---:|---:|---|---:|---:|",
    ]
    for suite, metric, i, card in table:
        card_text = "" if card is None else f"{card:.2f}"
        lines.append(
            f"| {suite} | {metric} | {i.value:.2f} | {i.se:.2f} | {i.low:.2f}–{i.high:.2f} ({i.method}) "
            f"| {card_text} | {i.n} |"
        )
    lines += [
        "",
        f"Card: the {CARD_SOURCE}, in percent; ours in percent over the n items the metric was measured "
        "on, ± its standard error and its 95% interval: wilson (the Wilson interval, items that pass or "
        "fail), normal (a mean of per-item scores between 0 and 1) or bootstrap (the suite's own summary "
        f"over {RESAMPLES} resamples of the items, seed {SEED}).",
        "",
    ]
    for r in results:
        if r.skipped:
            lines.append(f"- **{r.name}** skipped: {r.skipped}")
            continue
        if r.not_applicable:
            lines.append(f"- **{r.name}** not applicable: {r.not_applicable}")
            continue
        note = f"- **{r.name}**: {len(r.records)} items ({r.cached} from the cache)"
        if r.failures:
            note += f", {len(r.failures)} failed and left out of the scores"
        if r.fitted:
            note += f", max_tokens cut to the context on {r.fitted} requests"
        lines.append(f"{note}; settings `{json.dumps(r.settings, sort_keys=True)}`")
        lines += [f"  - failed `{item}`: {error}" for item, error in list(r.failures.items())[:5]]
    return "\n".join(lines) + "\n"


def chart(table: list[Row], path: Path, title: str) -> None:
    """Horizontal bars with their 95% intervals, ours beside the card's where it has a number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * max(1, len(table))))
    labels = [f"{suite} · {metric}" for suite, metric, *_ in table]
    ys = range(len(table))
    values = [row[2] for row in table]
    ours = ax.barh(
        [y - 0.2 for y in ys],
        [i.value for i in values],
        height=0.4,
        label="ours (95% interval)",
        color="#3b6fb6",
        xerr=[[i.value - i.low for i in values], [i.high - i.value for i in values]],
        error_kw={"ecolor": "#1d3a63", "capsize": 2, "linewidth": 1},
    )
    ax.bar_label(ours, fmt="%.1f", padding=2, fontsize=8)
    carded = [(y, row[3]) for y, row in zip(ys, table, strict=True) if row[3] is not None]
    if carded:
        card = ax.barh(
            [y + 0.2 for y, _ in carded], [c for _, c in carded], height=0.4, label="card", color="#bbb"
        )
        ax.bar_label(card, fmt="%.1f", padding=2, fontsize=8, color="#666")
    ax.set_yticks(list(ys), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("percent")
    ax.set_title(title)
    ax.legend(loc="upper right", bbox_to_anchor=(1, -0.6 / fig.get_figheight()), ncols=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out: Path, results: list[SuiteResult], run: dict[str, Any]) -> dict[str, Path]:
    """Writes the three files into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "report": out / "report.md", "chart": out / "report.png"}
    table = rows(results)
    body = {**run, "suites": {r.name: dataclasses.asdict(r) for r in results}}
    for suite, metric, interval, _ in table:  # each score's interval beside it
        body["suites"][suite].setdefault("intervals", {})[metric] = dataclasses.asdict(interval)
    paths["results"].write_text(json.dumps(body, indent=1, ensure_ascii=False, default=str))
    paths["report"].write_text(markdown(results, run, table))
    chart(table, paths["chart"], f"levante eval: {run['model']}")
    return paths
