"""The last line of every imprint process: no traceback reaches a user, a console or a log.

Each console script's ``main`` runs its body through :func:`run_main`. An error the program
explains is handled before it gets here; what reaches this is a bug or an environment the code
did not foresee, and it ends as one clear line and a documented exit code: 130 for an interrupt
(Ctrl-C), 141 when the reader of stdout went away (as a program killed by SIGPIPE), 1 for
anything else. The traceback is printed only when the program runs at debug level (the owner's
and the site's ``--debug``, the agent's ``-v``, or IMPRINT_DEBUG=1 in the environment), and then
line by line through the same writer, so text inside it is rendered like any other line.
:func:`install_hooks` does the same for exceptions that end a thread or are raised where Python
can only print them ("Exception ignored in ...").

Cheap to import (the agent's boot path imports it): :mod:`traceback` is loaded only to print one.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

INTERNAL_ERROR = 1
INTERRUPTED = 130
BROKEN_PIPE = 141

Say = Callable[[str], None]
_debug = {"on": os.environ.get("IMPRINT_DEBUG", "") not in ("", "0")}


def set_debug(on: bool) -> None:
    _debug["on"] = _debug["on"] or on


def debugging() -> bool:
    return _debug["on"]


def describe(exc: BaseException) -> str:
    """One line naming the failure: the OS's words and the file for an OSError, else the type
    and the message."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename is not None else ""
        return f"{exc.strerror}{where}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _traceback_lines(exc: BaseException) -> list[str]:
    import traceback

    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip("\n").split("\n")


def report(say: Say, what: str, exc: BaseException, *, hint: str) -> None:
    """One line; at debug level the traceback follows, one ``say`` per line."""
    if not debugging():
        say(f"{what}: {describe(exc)}" + (f" {hint}" if hint else ""))
        return
    say(f"{what}: {describe(exc)}")
    for line in _traceback_lines(exc):
        say(line)


def robust_streams() -> None:
    """Characters stdout/stderr cannot encode (a C or Latin-1 locale) are written as escapes
    instead of raising UnicodeEncodeError half-way through the output."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


def _silence_stdout() -> None:
    # Later writes and the interpreter's final flush would raise again and print "Exception ignored".
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def run_main(body: Callable[[], int], say: Say, *, hint: str = "(run with --debug for the traceback)") -> int:
    """``body()``'s exit code; anything it raises ends as one line through ``say`` and a code."""
    try:
        code = body()
        sys.stdout.flush()
        return code
    except SystemExit:
        raise  # argparse's usage errors (2) and explicit exits keep their codes
    except KeyboardInterrupt:
        say("interrupted")
        return INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE
    except Exception as exc:
        try:
            report(say, "internal error", exc, hint=hint)
        except Exception:  # noqa: S110 (the writer itself is broken: nothing left to report with)
            pass
        return INTERNAL_ERROR


def install_hooks(say: Say, *, hint: str = "") -> None:
    """Thread-ending and unraisable exceptions as one line (and the traceback at debug level)."""

    def thread_hook(hook_args: threading.ExceptHookArgs) -> None:
        exc = hook_args.exc_value
        if exc is None or isinstance(exc, SystemExit):
            return
        name = hook_args.thread.name if hook_args.thread is not None else "a thread"
        report(say, f"internal error in {name}", exc, hint=hint)

    def unraisable_hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if exc is None:
            return
        report(say, "internal error (ignored)", exc, hint=hint)

    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook

