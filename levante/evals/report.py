"""What a run leaves behind: results.json (every item's prompt, answer and scores), report.md (the
model card's table with our numbers next to the published ones) and report.png (the same as bars)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from levante.evals.runner import SuiteResult

CARD_SOURCE = "Mistral-Small-3.2-24B-Instruct-2506 model card"


def rows(results: list[SuiteResult]) -> list[tuple[str, str, float, float | None, int]]:
    """(suite, metric, ours, card, n): the card's metrics first, in its order, then our extras."""
    out = []
    for r in results:
        names = [m for m in r.card if m in r.metrics] + [m for m in r.metrics if m not in r.card]
        for m in names:  # n: the records scored on m (a suite's subsets), else all of them
            n = sum(m in rec.scores for rec in r.records) or len(r.records)
            out.append((r.name, m, r.metrics[m], r.card.get(m), n))
    return out


def markdown(results: list[SuiteResult], run: dict[str, Any]) -> str:
    lines = [
        f"# levante eval: {run['model']}",
        "",
        f"Endpoint: {run['endpoint']} · {'bundled samples' if run['sample'] else 'full datasets'}"
        + (f" · first {run['limit']} items per suite" if run["limit"] else ""),
        "",
        "| suite | metric | ours | card | n |\n|---|---|---:|---:|---:|",
    ]
    for suite, metric, ours, card, n in rows(results):
        lines.append(f"| {suite} | {metric} | {ours:.2f} | {'' if card is None else f'{card:.2f}'} | {n} |")
    lines += ["", f"Card: the {CARD_SOURCE}, in percent; ours in percent over n items.", ""]
    for r in results:
        if r.skipped:
            lines.append(f"- **{r.name}** skipped: {r.skipped}")
            continue
        note = f"- **{r.name}**: {len(r.records)} items ({r.cached} from the cache)"
        if r.failures:
            note += f", {len(r.failures)} failed and left out of the scores"
        lines.append(f"{note}; settings `{json.dumps(r.settings, sort_keys=True)}`")
        lines += [f"  - failed `{item}`: {error}" for item, error in list(r.failures.items())[:5]]
    return "\n".join(lines) + "\n"


def chart(results: list[SuiteResult], path: Path, title: str) -> None:
    """Horizontal bars, ours beside the card's where it has a number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = rows(results)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * max(1, len(table))))
    labels = [f"{suite} · {metric}" for suite, metric, *_ in table]
    ys = range(len(table))
    ours = ax.barh(
        [y - 0.2 for y in ys], [row[2] for row in table], height=0.4, label="ours", color="#3b6fb6"
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
    body = {**run, "suites": {r.name: dataclasses.asdict(r) for r in results}}
    paths["results"].write_text(json.dumps(body, indent=1, ensure_ascii=False, default=str))
    paths["report"].write_text(markdown(results, run))
    chart(results, paths["chart"], f"levante eval: {run['model']}")
    return paths
