"""Progress display: bars on a terminal, plain lines (no control characters) in a log file."""

import io

from tq_transformers.evaluation import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_file_gets_plain_lines_with_phase_unit_and_end():
    stream = io.StringIO()
    overall = progress.Overall({"a": 10})
    with progress.bar(desc="perplexity (5 caches)", unit="chunk", total=4, stream=stream, overall=overall) as p:
        assert isinstance(p, progress.LineProgress)
        for _ in range(4):
            overall.advance(2)
            p.update(1)
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("perplexity (5 caches) started: 0/4 chunk")
    assert lines[-1].startswith("perplexity (5 caches) done: 4/4 chunk")
    assert "overall 80%" in lines[-1]


def test_log_lines_are_rate_limited():
    stream = io.StringIO()
    p = progress.LineProgress(None, "x", "token", 100, stream, interval=3600)
    for _ in range(100):
        p.update(1)
    p.close()
    p.close()  # closing twice prints the end once
    assert len(stream.getvalue().splitlines()) == 2
    stream = io.StringIO()
    p = progress.LineProgress(None, "x", "token", 3, stream, interval=0)
    for _ in range(3):
        p.update(1)
    assert len(stream.getvalue().splitlines()) == 4  # the start line and one per step


def test_iterating_counts_and_closes():
    stream = io.StringIO()
    assert list(progress.bar(range(3), desc="d", unit="u", stream=stream)) == [0, 1, 2]
    assert stream.getvalue().splitlines()[-1].startswith("d done: 3/3 u")


def test_terminal_gets_a_tqdm_bar_that_stays():
    tqdm = __import__("pytest").importorskip("tqdm")
    stream = _Terminal()
    p = progress.bar(desc="needle", unit="token", total=2, stream=stream)
    assert isinstance(p, tqdm.tqdm) and p.leave
    p.update(2)
    p.close()
    assert "needle" in stream.getvalue() and "token" in stream.getvalue()


def test_overall_estimate():
    o = progress.Overall({"a": 30, "b": 10})
    assert o.seconds_left() is None and o.describe().endswith("~? left")
    o.advance(10)
    assert o.seconds_left() >= 0 and o.describe().startswith("overall 25%")
    o.advance(30)
    assert o.seconds_left() == 0


def test_a_phase_ended_early_says_stopped():
    stream = io.StringIO()
    try:
        with progress.bar(desc="download", unit="part", total=3, stream=stream) as p:
            p.update(1)
            raise RuntimeError("network")
    except RuntimeError:
        pass
    assert stream.getvalue().splitlines()[-1].startswith("download stopped: 1/3 part")
