"""The printed report, table.md and the plots, on a hand-made results dict (no model)."""

import pytest
from eval_helpers import fake_results

from tq_transformers.evaluation import plots, report


def _row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{table}")


def test_interval_flag_only_when_it_includes_zero():
    res = fake_results(change_ci=((-1.0, 2.0), (0.5, 3.0)))
    table = report.table(res)
    headers = [h for _, h in report.COLUMNS]
    ci = headers.index("change 95% CI")
    assert _row(table, "kivi-a")[ci] == "[-1.00, +2.00] n.s."
    assert _row(table, "kivi-b")[ci] == "[+0.50, +3.00]"
    assert _row(table, "full (bfloat16)")[ci] == "-"


def test_table_labels_projection_and_measurement():
    table = report.table(fake_results())
    head = table.splitlines()[0]
    assert "proj. MiB (L3.1-8B 32K)" in head and "proj. saving" in head and "held (measured)" in head
    assert _row(table, "kivi-a")[-1] == "9.00 MiB @1280"


def test_header_names_model_dtype_and_token_counts():
    text = report.header(fake_results())
    assert "qwen2.5-coder-1.5b (a test model), bfloat16 on cpu" in text
    assert "1024-token context" in text and "256 scored tokens per setting" in text
    assert "Reference: full (bfloat16)" in text


def test_key_explains_every_column_with_this_runs_numbers():
    res = fake_results()
    res["config"]["projection"]["seq_len"] = 4096
    key = report.key(res)
    assert "a projection, not a measurement" in key and "at 4096 tokens" in key
    assert "blocks of 8, 2000 resamples" in key and "n.s." in key
    assert "1280 tokens" in key and "equal to the analytic estimate for every setting" in key
    res["methods"]["kivi-a"]["perplexity"]["estimated_bytes"] += 1
    assert "differs from the analytic estimate for kivi-a" in report.key(res)


def test_key_leaves_out_parts_that_did_not_run():
    res = fake_results()
    for m in res["methods"].values():
        del m["needle"]
    key = report.key(res)
    assert "- needle:" not in key and "- greedy agree:" in key
    assert report.needle_table(res) == ""


def test_timings_are_a_table():
    text = report.timings_table(fake_results())
    assert "| phase | seconds |" in text
    assert "| perplexity + fidelity | 41.0 |" in text and "| total | 74.7 |" in text
    assert "{" not in text  # not a JSON line


def test_table_md_holds_the_whole_report_and_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    res = fake_results()
    paths = report.write_outputs(res, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["frontier.png", "memory_fidelity.png", "memory_quality.png", "needle_heatmap.png",
                     "results.csv", "results.json", "table.md"]
    md = (tmp_path / "table.md").read_text()
    for part in ("Model: ", "| method |", "Key:", "Needle found (1) or not (0)", "| phase | seconds |"):
        assert part in md
    for p in paths:
        assert p.stat().st_size > 0


def test_heatmap_colours_are_colour_blind_safe_pair():
    # Okabe-Ito blue and orange: distinguishable in the common colour-vision deficiencies (not red/green).
    assert {report.FOUND_COLOUR, report.MISSED_COLOUR} == {"#0072B2", "#E69F00"}


def test_key_warns_when_few_tokens_are_scored():
    res = fake_results()
    assert "Only " not in report.key(res)  # 256 scored tokens
    for m in res["methods"].values():
        m["perplexity"]["scored_tokens"] = 32
    assert "Only 32 scored tokens: perplexity changes (either sign) and their intervals are rough" in report.key(res)


def _offsets(ax, gid: str) -> list[tuple[float, float]]:
    return [tuple(float(v) for v in xy) for c in ax.collections if c.get_gid() == gid for xy in c.get_offsets()]


def test_frontier_plots_the_measured_points_and_the_seeds_published_ones():
    plt = pytest.importorskip("matplotlib.pyplot")
    res = fake_results()
    res["methods"]["kivi-b"]["perplexity"]["fidelity"] = {"mean": 0.95, "worst_layer": 1, "worst_layer_mean": 0.8}
    fig = plots.frontier_figure(res, plt)
    try:
        fid, ppl, kl = fig.axes
        # x: the projected Llama-3.1-8B MiB; the reference is not a point
        assert _offsets(fid, "measured") == [(781.0, pytest.approx(97.0)), (500.0, pytest.approx(95.0))]
        assert _offsets(fid, "worst layer") == [(781.0, pytest.approx(90.0)), (500.0, pytest.approx(80.0))]
        assert _offsets(fid, "published") == [(1056.0, 99.4), (1024.0, 98.0), (288.0, 90.0)]
        assert "Llama-3.1-8B KV cache, MiB, projected to 32768 tokens" in fid.get_xlabel()
        assert "(analytic, not measured" in fid.get_xlabel()
        changes = [tuple(c.lines[0].get_xydata()[0]) for c in ppl.containers]
        assert changes == [(781.0, 1.0), (500.0, 2.0)]
        spans = [c.lines[2][0].get_segments()[0][:, 1].tolist() for c in ppl.containers]
        assert spans == [[-1.0, 2.0], [0.5, 3.0]]  # the 95% intervals
        assert [tuple(xy) for c in kl.collections for xy in c.get_offsets()] == [(781.0, 0.01), (500.0, 0.05)]
        assert fid.get_xscale() == "log"
    finally:
        plt.close(fig)


def test_frontier_leaves_the_published_points_out_at_another_projection():
    res = fake_results()
    res["config"]["projection"]["seq_len"] = 4096
    points = plots.frontier_points(res)
    assert points["published"] == [] and [r["method"] for r in points["measured"]] == ["kivi-a", "kivi-b"]
    res["config"]["projection"]["seq_len"] = plots.PUBLISHED_SEQ_LEN
    assert [p.mib for p in plots.frontier_points(res)["published"]] == [1056.0, 1024.0, 288.0]


def test_frontier_needs_a_measurement():
    plt = pytest.importorskip("matplotlib.pyplot")
    res = fake_results()
    for m in res["methods"].values():
        m["perplexity"] = None
    assert plots.frontier_figure(res, plt) is None
    assert plots.plot_frontier(res, None, plt) == []
