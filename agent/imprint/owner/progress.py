"""What ``imprint bind --from`` shows while it runs: a one-line progress bar on a terminal, or
one JSON line per VM (with ``--json``, or when the output is not a terminal: a program reads it).

The bar is redrawn in place (carriage return, erase line) at most every ``REDRAW`` seconds and
at every failure, which is printed on its own line above it; what a VM said reaches the terminal
only through :func:`imprint.safetext.printable` (a hostile agent's error text is not escape
sequences on the owner's terminal). Thread-safe: the fleet's workers report from their threads.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import TextIO

from imprint.owner.fleet import FleetResult, FleetSummary
from imprint.safetext import printable

REDRAW = 0.1
BAR_WIDTH = 30


class JsonLines:
    """One JSON object per finished VM, then the summary; flushed per line (a reader follows)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def result(self, result: FleetResult) -> None:
        self._write(result.to_json())

    def summary(self, summary: FleetSummary) -> None:
        self._write(summary.to_json())

    def _write(self, data: object) -> None:
        with self._lock:
            self._out.write(json.dumps(data) + "\n")  # ensure_ascii: control characters escaped
            self._out.flush()


class ProgressBar:
    """``[=========>          ] 23/50  bound 20  already 1  failed 2  14.2/s``"""

    def __init__(self, out: TextIO, total: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._out = out
        self._total = total
        self._clock = clock
        self._started = clock()
        self._drawn_at = -REDRAW
        self._counts = {"bound": 0, "already-bound": 0, "failed": 0}
        self._lock = threading.Lock()

    def result(self, result: FleetResult) -> None:
        with self._lock:
            if result.outcome in self._counts:
                self._counts[result.outcome] += 1
            if result.outcome == "failed":
                self._clear()
                self._out.write(f"{printable(result.name)}: exit {result.exit_code}: "
                                f"{printable(result.error or '')}\n")
                self._draw()
            elif self._clock() - self._drawn_at >= REDRAW or self._done == self._total:
                self._draw()

    def summary(self, summary: FleetSummary) -> None:
        with self._lock:
            self._clear()
            rate = summary.count("bound") / summary.seconds if summary.seconds > 0 else 0.0
            parts = [f"{summary.count('bound')} bound", f"{summary.count('already-bound')} already bound",
                     f"{summary.count('failed')} failed"]
            if summary.count("not-started"):
                parts.append(f"{summary.count('not-started')} not started (interrupted)")
            self._out.write(f"{len(summary.results)} VMs in {summary.seconds:.1f} s ({rate:.1f} binds/s): "
                            f"{', '.join(parts)}; exit {summary.exit_code}\n")
            self._out.flush()

    def line(self) -> str:
        done = self._done
        filled = BAR_WIDTH * done // self._total if self._total else BAR_WIDTH
        bar = "=" * filled + (">" if filled < BAR_WIDTH else "") + " " * (BAR_WIDTH - filled - 1)
        elapsed = self._clock() - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        c = self._counts
        return (f"[{bar[:BAR_WIDTH]}] {done}/{self._total}  bound {c['bound']}  already {c['already-bound']}  "
                f"failed {c['failed']}  {rate:.1f}/s")

    @property
    def _done(self) -> int:
        return sum(self._counts.values())

    def _draw(self) -> None:
        self._out.write("\r\x1b[K" + self.line())
        self._out.flush()
        self._drawn_at = self._clock()

    def _clear(self) -> None:
        self._out.write("\r\x1b[K")
