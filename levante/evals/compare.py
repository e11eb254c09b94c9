"""`levante eval compare RUN_A RUN_B [RUN_C …]`: is this setup as good as that one? Each run after
the first is compared with the first on the items both scored: per metric both scores, B − A
with its paired 95% interval (and McNemar's exact test where items pass or fail), the items that
flipped with both answers. Writes compare.md, compare.json and compare.png (the differences with
their intervals)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from levante.errors import LevanteError
from levante.evals.stats import RESAMPLES, SEED
from levante.evals.suite import Record
from levante.evals.uncertainty import differences, summary_of

SHOWN_FLIPS = 20  # flipped items listed per metric in compare.md (compare.json has them all)


@dataclass(frozen=True)
class Run:
    """A finished `levante eval` run: its label (the folder's name) and its results.json."""

    label: str
    body: dict[str, Any]


def load(path: Path) -> Run:
    """A run from its --out folder or its results.json."""
    if not path.exists():
        raise LevanteError(
            f"{path}: no such run (give a folder `levante eval --out` wrote, or its results.json)"
        )
    file = path / "results.json" if path.is_dir() else path
    try:
        body = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LevanteError(f"{file}: not the results.json of a levante eval run ({e})") from None
    if not isinstance(body, dict) or not isinstance(body.get("suites"), dict):
        raise LevanteError(f"{file}: not the results.json of a levante eval run (no suites)")
    return Run(file.parent.name, body)


def _unusable(suite: dict[str, Any]) -> str | None:
    if suite.get("not_applicable"):
        return f"not applicable: {suite['not_applicable']}"
    if suite.get("skipped"):
        return f"skipped: {suite['skipped']}"
    return None if suite.get("records") else "no scored items"


def compare_suite(name: str, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One suite of two runs on their shared items: notes, metrics and flipped items."""
    for side, suite in (("A", a), ("B", b)):
        if (why := _unusable(suite)) is not None:
            return {"n": 0, "notes": [f"not compared: {side} {why}"], "metrics": {}, "flipped": {}}
    ra = {r["id"]: Record(**r) for r in a["records"]}
    rb = {r["id"]: Record(**r) for r in b["records"]}
    shared = [i for i in ra if i in rb]
    notes = []
    if len(shared) < max(len(ra), len(rb)):
        notes.append(
            f"compared on the {len(shared)} items both runs scored (A has {len(ra) - len(shared)} "
            f"more, B {len(rb) - len(shared)} more)"
        )
    changed = sorted(
        k for k in {*a["settings"], *b["settings"]} if a["settings"].get(k) != b["settings"].get(k)
    )
    if changed:
        notes.append(
            "settings differ: "
            + ", ".join(f"{k} {a['settings'].get(k)!r} → {b['settings'].get(k)!r}" for k in changed)
        )
    if not shared:
        return {"n": 0, "notes": [*notes, "not compared: no item in common"], "metrics": {}, "flipped": {}}
    left, right = [ra[i] for i in shared], [rb[i] for i in shared]
    found = differences(summary_of(name), left, right)
    metrics = {m: dataclasses.asdict(d) | {"significant": d.significant} for m, d in found.items()}
    flipped = {
        m: [
            {"id": x.id, "a": x.scores[m], "b": y.scores[m], "a_answer": x.answer, "b_answer": y.answer}
            for x, y in zip(left, right, strict=True)
            if m in x.scores and m in y.scores and x.scores[m] != y.scores[m]
        ]
        for m, d in found.items()
        if d.p_mcnemar is not None
    }
    return {
        "n": len(shared),
        "notes": notes,
        "metrics": metrics,
        "flipped": {m: f for m, f in flipped.items() if f},
    }


def compare(a: Run, b: Run) -> dict[str, Any]:
    suites = {}
    for name, suite in a.body["suites"].items():
        other = b.body["suites"].get(name)
        if other is None:
            suites[name] = {"n": 0, "notes": ["not compared: B did not run it"], "metrics": {}, "flipped": {}}
        else:
            suites[name] = compare_suite(name, suite, other)
    for name in b.body["suites"]:
        if name not in suites:
            suites[name] = {"n": 0, "notes": ["not compared: A did not run it"], "metrics": {}, "flipped": {}}
    return {"a": a.label, "b": b.label, "suites": suites}


def _describe(run: Run) -> str:
    body = run.body
    data = "bundled samples" if body.get("sample") else "full datasets"
    return f"**{run.label}**: {body.get('model')} at {body.get('endpoint')} · {data} · `{body.get('target')}`"


def _cell(text: Any, limit: int = 160) -> str:
    if isinstance(text, list) and len(text) == 1:  # one sample's answer (pass@1)
        text = text[0]
    flat = " ".join((text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)).split())
    flat = flat if len(flat) <= limit else flat[: limit - 1] + "…"
    return flat.replace("|", "\\|").replace("`", "'")


def markdown(runs: list[Run], comparisons: list[dict[str, Any]]) -> str:
    lines = ["# levante eval compare", "", f"A (the baseline): {_describe(runs[0])}", ""]
    lines += [f"B: {_describe(run)}" + "\n" for run in runs[1:]]
    for c in comparisons:
        lines += [f"## {c['b']} (B) vs {c['a']} (A)", ""]
        lines += [
            "| suite | metric | A | B | B − A | 95% CI | McNemar p | n |",
            "|---|---|---:|---:|---:|---|---:|---:|",
        ]
        for name, suite in c["suites"].items():
            for metric, d in suite["metrics"].items():
                mark = " *" if d["significant"] else ""
                p = "" if d["p_mcnemar"] is None else f"{d['p_mcnemar']:.3g}"
                lines.append(
                    f"| {name} | {metric} | {d['a']:.2f} | {d['b']:.2f} | {d['diff']:+.2f}{mark} | "
                    f"{d['low']:+.2f} to {d['high']:+.2f} | {p} | {d['n']} |"
                )
        lines += [
            "",
            f"Scores in percent; B − A in percentage points with its 95% interval from a paired bootstrap "
            f"over the shared items ({RESAMPLES} resamples, seed {SEED}: the mean of per-item scores, or "
            "the suite's own summary recomputed); * marks an interval that excludes zero. McNemar: the "
            "exact two-sided test on the items that flipped, for pass/fail metrics.",
            "",
        ]
        for name, suite in c["suites"].items():
            lines += [f"- **{name}**: {note}" for note in suite["notes"]]
        flips = [(name, m, f) for name, suite in c["suites"].items() for m, f in suite["flipped"].items()]
        if flips:
            lines += ["", "### Items that flipped", ""]
        for name, metric, items in flips:
            lines += [f"**{name} · {metric}** ({len(items)}):", ""]
            for f in items[:SHOWN_FLIPS]:
                a, b = _cell(f["a_answer"]), _cell(f["b_answer"])
                lines.append(f"- `{_cell(f['id'], 80)}`: A {f['a']:g} “{a}” · B {f['b']:g} “{b}”")
            if len(items) > SHOWN_FLIPS:
                lines.append(f"- … {len(items) - SHOWN_FLIPS} more in compare.json")
            lines.append("")
    return "\n".join(lines) + "\n"


def chart(comparisons: list[dict[str, Any]], path: Path) -> None:
    """B − A per metric as a point with its 95% interval, a line at zero; one colour per B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(
        dict.fromkeys((name, m) for c in comparisons for name, s in c["suites"].items() for m in s["metrics"])
    )
    rows = max(1, len(keys))
    fig, ax = plt.subplots(figsize=(8, 2.2 + 0.5 * rows * max(1, len(comparisons)) ** 0.5))
    colours = ["#3b6fb6", "#c4572a", "#4f8a3c", "#7c5cc4", "#b58900"]
    step = 0.6 / max(1, len(comparisons))
    for j, c in enumerate(comparisons):
        points = [
            (y + (j - (len(comparisons) - 1) / 2) * step, d)
            for y, (name, m) in enumerate(keys)
            if (d := c["suites"].get(name, {}).get("metrics", {}).get(m)) is not None
        ]
        if not points:
            continue
        ax.errorbar(
            [d["diff"] for _, d in points],
            [y for y, _ in points],
            xerr=[[d["diff"] - d["low"] for _, d in points], [d["high"] - d["diff"] for _, d in points]],
            fmt="o",
            capsize=3,
            color=colours[j % len(colours)],
            label=f"{c['b']} − {c['a']}",
        )
    ax.axvline(0, color="#888", linewidth=1)
    ax.set_yticks(range(len(keys)), [f"{name} · {m}" for name, m in keys])
    ax.set_ylim(rows - 0.5, -0.5)  # the first metric on top
    ax.set_xlabel("difference, percentage points (95% interval)")
    ax.set_title("levante eval compare")
    fig.legend(loc="lower center", ncols=min(3, max(1, len(comparisons))), frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out: Path, runs: list[Run]) -> dict[str, Path]:
    """Compares every run after the first with the first; writes the three files into `out`."""
    if len(runs) < 2:
        raise LevanteError("compare needs at least two runs")
    comparisons = [compare(runs[0], run) for run in runs[1:]]
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / "compare.md", "results": out / "compare.json", "chart": out / "compare.png"}
    body = {
        "runs": [
            {"label": r.label, **{k: r.body.get(k) for k in ("model", "endpoint", "sample")}} for r in runs
        ]
    }
    body |= {"resamples": RESAMPLES, "seed": SEED, "comparisons": comparisons}
    paths["results"].write_text(json.dumps(body, indent=1, ensure_ascii=False, default=str))
    paths["report"].write_text(markdown(runs, comparisons))
    chart(comparisons, paths["chart"])
    return paths
