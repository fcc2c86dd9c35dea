"""Progress of a long command: a bar on a terminal, and one plain line every ~10 s everywhere else.

A bar redraws itself with carriage returns; a log file, or the output `ray job submit` streams back, keeps every
frame, dozens of them on one line. So where stderr is not a terminal, progress is a line of text instead: how much
is done of how much, the rate and the time left, every ``every`` seconds and once at the end.

``BGSPLIT_PROGRESS=0`` turns progress off in a process (a Ray task of a shard pass: the driver reports the tasks).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, TextIO

EVERY_S = 10.0
"""Seconds between two progress lines when stderr is not a terminal."""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LineProgress:
    """tqdm's calls (update, set_postfix, set_postfix_str, close), written as plain lines."""

    def __init__(self, total: int, *, initial: int = 0, unit: str = "it", desc: str = "", every: float = EVERY_S,
                 write: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.total, self.n, self.initial, self.unit, self.desc = total, initial, initial, unit, desc
        self.every, self.clock = every, clock
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.start = self.last = clock()
        self.extra = ""
        self.written = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every:
            self._line(now)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.extra = text

    def set_postfix(self, **values: Any) -> None:
        self.extra = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if self.n != self.written:
            self._line(self.clock(), final=True)

    def line(self, now: float, final: bool = False) -> str:
        done, elapsed = self.n - self.initial, max(now - self.start, 1e-9)
        rate = done / elapsed
        head = f"{self.desc}: " if self.desc else ""
        of = f"/{self.total:,} {self.unit}" if self.total else f" {self.unit}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        text = f"{head}{self.n:,}{of}{pct}, {rate:,.1f} {self.unit}/s"
        if final:
            text += f", done in {_duration(elapsed)}"
        elif self.total and rate > 0:
            text += f", {_duration(max(self.total - self.n, 0) / rate)} left"
        return text + (f", {self.extra}" if self.extra else "")

    def _line(self, now: float, final: bool = False) -> None:
        self.write(self.line(now, final))
        self.last, self.written = now, self.n


class NoProgress:
    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **values: Any) -> None: ...

    def set_postfix_str(self, text: str, refresh: bool = True) -> None: ...

    def close(self) -> None: ...


def progress(total: int, *, initial: int = 0, unit: str = "it", desc: str = "", enabled: bool = True,
             stream: TextIO | None = None, every: float = EVERY_S) -> Any:
    """A tqdm bar when ``stream`` (stderr) is a terminal, else a LineProgress; nothing when not ``enabled`` or when
    BGSPLIT_PROGRESS=0."""
    if not enabled or os.environ.get("BGSPLIT_PROGRESS", "1") == "0":
        return NoProgress()
    stream = stream or sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if tty:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit=unit, desc=desc or None, leave=False, dynamic_ncols=True,
                    file=stream, smoothing=0.1)
    return LineProgress(total, initial=initial, unit=unit, desc=desc, every=every,
                        write=lambda line: print(line, file=stream, flush=True))
