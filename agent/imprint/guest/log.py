"""The agent's log: one line per message on stderr, prefixed ``imprint-agent:`` (systemd sends
the agent's stderr to the journal and the console, where sites and tests read it).

Every line is rendered by :func:`render`: one printable line (control characters, newlines,
bidi overrides and every other non-printable character escaped by :mod:`imprint.safetext`),
bounded in length, and never containing the VM token announcement's marker. Messages carry text from outside (a peer's
alert detail, names from a site's seed, a local user's file names); the console they reach is
also the reverse channel, where a forged ``IMPRINT-VM-TOKEN`` line would be read as the agent's
own. Only :class:`imprint.guest.cli._Announcer` writes that marker, and not through this log.

Not the :mod:`logging` module on the boot path: importing it (with ``traceback``, ``string`` and
their imports) is a measurable part of the agent's start under emulation, where every module
costs ~20x its native time (benchmarks/bench_boot.py). Backends keep :mod:`logging` (it is part
of their contract); :func:`route_stdlib` sends those records to the same stream and through the
same rendering, once the agent runs and a backend is loaded.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, TextIO

from imprint.safetext import printable
from imprint.tokens import VM_TOKEN_LINE_PREFIX

if TYPE_CHECKING:
    import logging

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
PREFIX = "imprint-agent: "
LINE_LIMIT = 2000
# The marker with its hyphen escaped: still readable, never what the extractor looks for.
_DEFANGED_MARKER = VM_TOKEN_LINE_PREFIX.replace("-", "\\x2d", 1)
_state = {"level": INFO, "configured": False}
_write_lock = threading.Lock()


def configure(*, verbose: bool) -> None:
    """The running agent's log: also Python's warnings, which would print raw multi-line text."""
    import warnings  # imported by the interpreter's start-up already: free

    _state["level"] = DEBUG if verbose else INFO
    _state["configured"] = True
    warnings.showwarning = _show_warning


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    _emit(WARNING, f"{category.__name__}: {message} ({filename}:{lineno})")


def enabled(level: int) -> bool:
    return level >= _state["level"]


def render(message: str) -> str:
    """One log line's text (without the prefix): safe for a console that is a reverse channel."""
    return printable(message, LINE_LIMIT).replace(VM_TOKEN_LINE_PREFIX, _DEFANGED_MARKER)


def _emit(level: int, message: str) -> None:
    if not enabled(level):
        return
    _write(PREFIX + render(message) + "\n")


def _write(lines: str) -> None:
    stream = sys.stderr  # looked up per call: tests capture it
    with _write_lock:
        try:
            stream.write(lines)
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or full stderr must not take the agent down; nothing else can report it


def _format(message: str, args: tuple[object, ...]) -> str:
    if not args:
        return message
    try:
        return message % args
    except (TypeError, ValueError, KeyError):
        return f"{message} {args!r}"  # a wrong format string in a rare path must not raise


def _traceback_lines() -> list[str]:
    import traceback

    return traceback.format_exc().rstrip("\n").split("\n")


class Log:
    """The subset of :class:`logging.Logger` the agent uses, with the same %-style arguments."""

    def __init__(self, name: str) -> None:
        self.name = name

    def debug(self, message: str, *args: object) -> None:
        if enabled(DEBUG):
            _emit(DEBUG, _format(message, args))

    def info(self, message: str, *args: object) -> None:
        _emit(INFO, _format(message, args))

    def warning(self, message: str, *args: object) -> None:
        _emit(WARNING, _format(message, args))

    def error(self, message: str, *args: object) -> None:
        _emit(ERROR, _format(message, args))

    def exception(self, message: str, *args: object) -> None:
        """The message and the exception on one line; the traceback only at debug level, one
        rendered line per traceback line."""
        exc = sys.exc_info()[1]
        summary = f"{type(exc).__name__}: {exc}" if exc is not None else "no exception"
        _emit(ERROR, f"{_format(message, args)}: {summary}")
        if enabled(DEBUG) and exc is not None:
            _write("".join(PREFIX + render(line) + "\n" for line in _traceback_lines()))


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
    handler.setFormatter(_stdlib_formatter())
    handler._imprint_agent = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if _state["level"] == DEBUG else logging.INFO)
    logger.propagate = False


def _stdlib_formatter() -> logging.Formatter:
    import logging

    class SafeFormatter(logging.Formatter):
        """A record as the agent's own lines: prefixed, rendered, the traceback only at debug."""

        def format(self, record: logging.LogRecord) -> str:
            try:
                message = record.getMessage()
            except (TypeError, ValueError, KeyError):
                message = f"{record.msg} {record.args!r}"
            lines = [message]
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                lines[0] += f": {type(exc).__name__}: {exc}"
                if enabled(DEBUG):
                    import traceback

                    lines += "".join(traceback.format_exception(*record.exc_info)).rstrip("\n").split("\n")
            # StreamHandler adds the final newline.
            return "\n".join(PREFIX + render(line) for line in lines)

    return SafeFormatter()
