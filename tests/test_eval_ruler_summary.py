"""RULER result summaries (tq_transformers.evaluation.ruler_summary), model-free: merging runs split by length,
drops against the reference, where each setting breaks first, the targets, and the command line."""

from __future__ import annotations

import json

import pytest

from tq_transformers.evaluation import ruler_summary


def run(scores: dict[str, dict[str, dict[str, float]]]) -> dict:
    """A results dict of one RULER run: per setting, per task, per length, a score."""
    methods = {}
    for name, per_task in scores.items():
        lengths = sorted({n for t in per_task.values() for n in t}, key=int)
        avg = {n: sum(t[n] for t in per_task.values()) / len(per_task) for n in lengths}
        methods[name] = {"label": name, "ruler": {"scores": per_task, "average": avg,
                                                  "answers": {f"{t}@{n}": [name] for t in per_task for n in lengths}}}
    lengths = sorted({int(n) for per in scores.values() for t in per.values() for n in t})
    return {"methods": methods, "model": {"name": "tiny", "dtype": "float32"}, "config": {},
            "ruler": {"num_samples": 1, "lengths": lengths, "tasks": {t: {} for t in next(iter(scores.values()))},
                      "samples": {f"{t}@{n}": [] for t in next(iter(scores.values())) for n in lengths}}}


SHORT = run({"full": {"vt": {"4096": 100.0}, "cwe": {"4096": 80.0}},
             "turboquant-4": {"vt": {"4096": 100.0}, "cwe": {"4096": 79.0}},
             "kivi-2": {"vt": {"4096": 90.0}, "cwe": {"4096": 80.0}}})
LONG = run({"full": {"vt": {"32768": 60.0}, "cwe": {"32768": 40.0}},
            "turboquant-4": {"vt": {"32768": 50.0}, "cwe": {"32768": 40.0}},
            "kivi-2": {"vt": {"32768": 54.0}, "cwe": {"32768": 34.0}}})


def test_merge_puts_lengths_in_order_and_recomputes_averages():
    merged = ruler_summary.merge_results([LONG, SHORT])
    res = merged["methods"]["kivi-2"]["ruler"]
    assert list(res["scores"]["vt"]) == ["4096", "32768"] and merged["ruler"]["lengths"] == [4096, 32768]
    assert res["average"] == {"4096": 85.0, "32768": 44.0}
    assert set(res["answers"]) == {"vt@4096", "cwe@4096", "vt@32768", "cwe@32768"}
    assert set(merged["ruler"]["samples"]) == {"vt@4096", "cwe@4096", "vt@32768", "cwe@32768"}
    with pytest.raises(ValueError, match="parts must run the same settings"):
        ruler_summary.merge_results([SHORT, run({"full": {"vt": {"8192": 1.0}}})])


def test_drops_first_break_and_targets():
    merged = ruler_summary.merge_results([SHORT, LONG])
    d = ruler_summary.drops(merged)
    assert d["turboquant-4"] == {"4096": (1.0, ["cwe"]), "32768": (10.0, ["vt"])}
    assert d["kivi-2"] == {"4096": (10.0, ["vt"]), "32768": (6.0, ["cwe", "vt"])}
    assert ruler_summary.first_break(merged, 5.0) == {"turboquant-4": ("32768", ["vt"]), "kivi-2": ("4096", ["vt"])}
    assert ruler_summary.first_break(merged, 20.0) == {"turboquant-4": None, "kivi-2": None}
    text = ruler_summary.summary_markdown(merged, 5.0)
    assert "| turboquant-4 | 1 (cwe) | 10 (vt) |" in text
    assert "- turboquant-4 within 2 points: missed (largest drop 10)" in text
    assert "- kivi-2: 4096 tokens (vt)" in text


def test_command_line_writes_merged_results(tmp_path):
    pytest.importorskip("matplotlib")
    files = []
    for i, part in enumerate((SHORT, LONG)):
        files.append(tmp_path / f"part{i}.json")
        files[-1].write_text(json.dumps(part))
    out = tmp_path / "merged"
    assert ruler_summary.main([str(f) for f in files] + ["--out", str(out)]) == 0
    merged = json.loads((out / "results.json").read_text())
    assert merged["ruler"]["lengths"] == [4096, 32768]
    assert "| 32768 tokens | vt | cwe | avg |" in (out / "summary.md").read_text()
    assert (out / "ruler_heatmap.png").stat().st_size > 0
