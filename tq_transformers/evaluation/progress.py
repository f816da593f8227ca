"""Progress of the evaluation: one bar per phase on a terminal, plain log lines when the output is a file.

`bar(...)` is a tqdm bar (kept on screen when done) when its stream is a terminal, and otherwise a `LineProgress`
that prints a plain line (no carriage returns or escape codes) at most every `LINE_INTERVAL_S` seconds and once at the
end, so a log file stays readable. `Overall` turns the work of every phase into one estimate of the time left.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

#: Seconds between two plain progress lines (log-file mode).
LINE_INTERVAL_S = 30.0

#: Cost of one forward pass in the `Overall` model, in "token rows" (a forward of B rows x T new tokens costs
#: B * T + FORWARD_OVERHEAD). On the CPU a one-token decode step of a 1.5B model costs about as much as prefilling
#: a few dozen tokens (the weights are read once per forward), so decode-heavy phases are not underestimated.
FORWARD_OVERHEAD = 32


def is_terminal(stream) -> bool:
    """True if `stream` is an interactive terminal (bars), False for files and pipes (plain lines)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


class Overall:
    """Estimated time left for the whole evaluation, from the work planned per phase (in token rows).

    The rate (seconds per token row) is measured on the work done so far, so the estimate improves as the run goes.
    """

    def __init__(self, plan: dict[str, float]):
        self.plan = {k: float(v) for k, v in plan.items()}
        self.done = 0.0
        self.start = time.perf_counter()

    @property
    def total(self) -> float:
        return sum(self.plan.values())

    def advance(self, units: float) -> None:
        self.done += units

    def seconds_left(self) -> float | None:
        """None until some work is done."""
        if self.done <= 0:
            return None
        rate = (time.perf_counter() - self.start) / self.done
        return rate * max(self.total - self.done, 0.0)

    def describe(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return f"overall {pct:.0f}%, ~{_fmt_s(self.seconds_left())} left"


class LineProgress:
    """A progress display for log files: `desc: 3/16 chunk, 12 s, ~40 s left` lines, no terminal control codes."""

    def __init__(self, iterable: Iterable | None, desc: str, unit: str, total: int | None, stream,
                 overall: Overall | None = None, interval: float = LINE_INTERVAL_S):
        self.iterable, self.desc, self.unit, self.stream = iterable, desc, unit, stream
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.overall, self.interval = overall, interval
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.perf_counter()
        self._closed = False
        self._print("started")

    def _line(self, note: str = "") -> str:
        elapsed = time.perf_counter() - self.start
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        text = f"{self.desc}{' ' + note if note else ''}: {count} {self.unit}, {_fmt_s(elapsed)}"
        if self.total and 0 < self.n < self.total:
            text += f", ~{_fmt_s(elapsed / self.n * (self.total - self.n))} left"
        if self.postfix:
            text += f" ({self.postfix})"
        if self.overall is not None:
            text += f"; {self.overall.describe()}"
        return text

    def _print(self, note: str = "") -> None:
        print(self._line(note), file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._print()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print("done" if self.total is None or self.n >= self.total else "stopped")

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(iterable: Iterable | None = None, *, desc: str, unit: str, total: int | None = None, stream=None,
        overall: Overall | None = None) -> Any:
    """A progress display for one phase: tqdm (left on screen when done) on a terminal, `LineProgress` otherwise.

    `desc` names the phase and the settings it runs, `unit` what one step is (e.g. "chunk", "token").
    """
    stream = stream if stream is not None else sys.stderr
    if is_terminal(stream):
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is an "eval" extra
            pass
        else:
            return tqdm(iterable, desc=desc, unit=unit, total=total, leave=True, dynamic_ncols=True, file=stream)
    return LineProgress(iterable, desc, unit, total, stream, overall=overall)
