"""The fleet's display (owner/progress.py) on its own: the bar counts and rates what finished, a
failure is its own line with the VM's words made printable, JSON lines are one object per VM.
The bar on a real pseudo-terminal, and none when piped, is tests/test_fleet.py."""

from __future__ import annotations

import io
import json

from imprint.owner.fleet import FleetResult, FleetSummary
from imprint.owner.progress import JsonLines, ProgressBar


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def result(name: str, outcome: str = "bound", code: int = 0, error: str | None = None) -> FleetResult:
    return FleetResult(name, "127.0.0.1:1", outcome, code, 0.01, error=error,  # type: ignore[arg-type]
                       kind="Unreachable" if error else None)


def test_the_bar_counts_each_outcome_and_the_rate() -> None:
    out, clock = io.StringIO(), Clock()
    bar = ProgressBar(out, 4, clock=clock)
    clock.now += 1.0
    bar.result(result("a"))
    bar.result(result("b", "already-bound"))
    assert bar.line().startswith("[" + "=" * 15 + ">")
    assert "2/4  bound 1  already 1  failed 0  2.0/s" in bar.line()
    clock.now += 1.0
    bar.result(result("c", "failed", 4, "no answer"))
    bar.result(result("d"))
    assert bar.line().startswith("[" + "=" * 30 + "]") and "4/4" in bar.line()
    assert out.getvalue().count("\r\x1b[K") >= 3  # redrawn in place


def test_a_failure_is_printed_with_the_vms_words_made_harmless() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, 2, clock=Clock())
    bar.result(result("web1", "failed", 3, "the agent said \x1b]0;owned\x07 \x1b[2J"))
    text = out.getvalue()
    assert "web1: exit 3: the agent said" in text
    shown = text.replace("\r\x1b[K", "")
    assert "\x1b" not in shown and "\x07" not in shown


def test_summary_line_and_json_lines() -> None:
    results = (result("a"), result("b", "failed", 4, "x"), result("c", "not-started", 130))
    summary = FleetSummary(results, 2.0, interrupted=True)
    out = io.StringIO()
    ProgressBar(out, 3, clock=Clock()).summary(summary)
    assert "3 VMs in 2.0 s (0.5 binds/s): 1 bound, 0 already bound, 1 failed, 1 not started (interrupted); exit 130" \
        in out.getvalue()
    lines_out = io.StringIO()
    writer = JsonLines(lines_out)
    for r in results:
        writer.result(r)
    writer.summary(summary)
    rows = [json.loads(line) for line in lines_out.getvalue().splitlines()]
    assert [r.get("vm") for r in rows[:3]] == ["a", "b", "c"]
    assert rows[1]["exit_code"] == 4 and rows[1]["error"] == "x"
    assert rows[3]["summary"]["exit_code"] == 130 and rows[3]["summary"]["not_started"] == 1
