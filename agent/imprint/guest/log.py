"""The agent's log: one line per message on stderr, prefixed ``imprint-agent:`` (systemd sends
the agent's stderr to the journal and the console, where sites and tests read it).

Not the :mod:`logging` module on the boot path: importing it (with ``traceback``, ``string`` and
their imports) is a measurable part of the agent's start under emulation, where every module
costs ~20x its native time (benchmarks/bench_boot.py). Backends keep :mod:`logging` (it is part
of their contract); :func:`route_stdlib` sends those records to the same stream, once the agent
runs and a backend is loaded.
"""

from __future__ import annotations

import sys
import threading

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
PREFIX = "imprint-agent: "
_state = {"level": INFO, "configured": False}
_write_lock = threading.Lock()


def configure(*, verbose: bool) -> None:
    _state["level"] = DEBUG if verbose else INFO
    _state["configured"] = True


def enabled(level: int) -> bool:
    return level >= _state["level"]


def _emit(level: int, message: str) -> None:
    if not enabled(level):
        return
    stream = sys.stderr  # looked up per call: tests capture it
    with _write_lock:
        stream.write(PREFIX + message + "\n")
        stream.flush()


class Log:
    """The subset of :class:`logging.Logger` the agent uses, with the same %-style arguments."""

    def __init__(self, name: str) -> None:
        self.name = name

    def debug(self, message: str, *args: object) -> None:
        if enabled(DEBUG):
            _emit(DEBUG, message % args if args else message)

    def info(self, message: str, *args: object) -> None:
        _emit(INFO, message % args if args else message)

    def warning(self, message: str, *args: object) -> None:
        _emit(WARNING, message % args if args else message)

    def error(self, message: str, *args: object) -> None:
        _emit(ERROR, message % args if args else message)

    def exception(self, message: str, *args: object) -> None:
        import traceback

        _emit(ERROR, (message % args if args else message) + "\n" + traceback.format_exc().rstrip())


def get(name: str) -> Log:
    return Log(name)


def route_stdlib(logger_name: str) -> None:
    """Send :mod:`logging` records of ``logger_name`` to the agent's stream (only in a running
    agent: in tests and other processes logging stays as configured there)."""
    if not _state["configured"]:
        return
    import logging

    logger = logging.getLogger(logger_name)
    if any(getattr(h, "_imprint_agent", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(PREFIX + "%(message)s"))
    handler._imprint_agent = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if _state["level"] == DEBUG else logging.INFO)
    logger.propagate = False
