"""Reading RULER results: merge the ``results.json`` of runs split by length or by task (the GPU suite runs in two
calls), each setting's largest drop against the full-precision reference per length, where each setting breaks first,
and the issue's targets (TurboQuant-4 within 2 points of the reference on every task at every length, KIVI-2 within 5).

    python -m tq_transformers.evaluation.ruler_summary results/a/results.json results/b/results.json --out results/m

writes ``results.json`` (merged), ``summary.md`` (the RULER table of `report.ruler_table` and the summary below) and
``ruler_heatmap.png`` (`plots.plot_ruler`) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

from .runner import REFERENCE

#: The issue's targets: the most points a setting may lose against the reference on any task at any length.
TARGETS = {"turboquant-4": 2.0, "kivi-2": 5.0}


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from runs of the same settings on other lengths or tasks (later parts win on overlaps).

    Args:
        parts: ``results.json`` contents, each with ``methods[name]["ruler"]`` (scores, average, answers) and
            ``ruler`` (the suite: samples, lengths, tasks).
    Returns:
        The first part with every part's RULER scores, answers, averages and samples merged in (lengths in ascending
        order), so that `report.ruler_table` and `plots.plot_ruler` read it as one run.
    """
    if not parts:
        raise ValueError("parts must hold at least one results dict, got none")
    names = [list(p["methods"]) for p in parts]
    if any(n != names[0] for n in names):
        raise ValueError(f"parts must run the same settings in the same order, got {names}")
    out = copy.deepcopy(parts[0])
    suite = out.setdefault("ruler", {})
    for part in parts[1:]:
        for name, res in part["methods"].items():
            mine = out["methods"][name].setdefault("ruler", {"scores": {}, "average": {}, "answers": {}})
            for task, per_length in res["ruler"]["scores"].items():
                mine["scores"].setdefault(task, {}).update(per_length)
            mine["answers"].update(res["ruler"]["answers"])
        other = part.get("ruler") or {}
        suite.setdefault("samples", {}).update(other.get("samples", {}))
        suite.setdefault("tasks", {}).update(other.get("tasks", {}))
    lengths = sorted({int(n) for res in out["methods"].values() for t in res["ruler"]["scores"].values() for n in t})
    suite["lengths"] = lengths
    for res in out["methods"].values():
        r = res["ruler"]
        r["scores"] = {t: {str(n): r["scores"][t][str(n)] for n in lengths if str(n) in r["scores"][t]}
                       for t in r["scores"]}
        r["average"] = {}
        for n in lengths:
            values = [per[str(n)] for per in r["scores"].values() if str(n) in per]
            if len(values) == len(r["scores"]):  # every task ran at this length
                r["average"][str(n)] = sum(values) / len(values)
    return out


def drops(results: dict[str, Any]) -> dict[str, dict[str, tuple[float, list[str]]]]:
    """Per setting (the reference left out) and length: (the largest drop in points below the reference over the
    tasks, the tasks with that drop). A negative drop means the setting scored above the reference everywhere."""
    methods = results["methods"]
    ref = methods[REFERENCE]["ruler"]["scores"]
    out: dict[str, dict[str, tuple[float, list[str]]]] = {}
    for name, res in methods.items():
        if name == REFERENCE:
            continue
        scores = res["ruler"]["scores"]
        per_length: dict[str, tuple[float, list[str]]] = {}
        for length in sorted({n for t in scores.values() for n in t}, key=int):
            delta = {t: ref[t][length] - scores[t][length] for t in scores if length in scores[t]}
            worst = max(delta.values())
            per_length[length] = (worst, sorted(t for t, d in delta.items() if d == worst))
        out[name] = per_length
    return out


def first_break(results: dict[str, Any], margin: float) -> dict[str, tuple[str, list[str]] | None]:
    """Per setting: (the shortest length, the tasks) where some task scores `margin` points or more below the
    reference, or None where it never does."""
    ref = results["methods"][REFERENCE]["ruler"]["scores"]
    out = {}
    for name, per_length in drops(results).items():
        scores = results["methods"][name]["ruler"]["scores"]
        out[name] = None
        for length in per_length:  # ascending
            tasks = sorted(t for t in scores if length in scores[t] and ref[t][length] - scores[t][length] >= margin)
            if tasks:
                out[name] = (length, tasks)
                break
    return out


def summary_markdown(results: dict[str, Any], margin: float, targets: dict[str, float] | None = None) -> str:
    """Markdown: the largest drop per setting and length, where each setting first loses `margin` points or more on
    some task, and the targets (setting name -> allowed drop) met or missed."""
    targets = TARGETS if targets is None else targets
    table = drops(results)
    lengths = sorted({n for per in table.values() for n in per}, key=int)
    lines = ["Largest drop below the reference (points, over the tasks) per length; the task(s) in brackets:", "",
             "| setting | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for name, per in table.items():
        cells = [f"{per[n][0]:.0f} ({', '.join(per[n][1])})" if n in per else "-" for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Where each setting first loses {margin:.0f} points or more on some task:", ""]
    for name, hit in first_break(results, margin).items():
        where = "not at any length run" if hit is None else f"{hit[0]} tokens ({', '.join(hit[1])})"
        lines.append(f"- {name}: {where}")
    present = {k: v for k, v in targets.items() if k in table}
    if present:
        lines += ["", "Targets (every task at every length):", ""]
        for name, allowed in present.items():
            worst = max(d for d, _ in table[name].values())
            lines.append(f"- {name} within {allowed:.0f} points: {'met' if worst <= allowed else 'missed'} "
                         f"(largest drop {worst:.0f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command line: merge results.json files, write the merged results, summary.md and ruler_heatmap.png."""
    from . import plots, report

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.json files of RULER runs of the same settings")
    p.add_argument("--out", required=True, help="folder for the merged results.json, summary.md and heatmap")
    p.add_argument("--margin", type=float, default=plots.RULER_DROP_MARK,
                   help="points below the reference that count as a break (default: the heatmap's mark)")
    args = p.parse_args(argv)
    merged = merge_results([json.loads(Path(f).read_text()) for f in args.results])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    (out / "summary.md").write_text(report.ruler_table(merged) + "\n\n" + summary_markdown(merged, args.margin) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is an "eval" extra
        plt = None
    if plt is not None:
        plots.plot_ruler(merged, out, plt)
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
