"""Deterministic crash points: a real kill -9 at a named durable step, for the crash tests.

Each durable write (a file renamed into place, a directory synced, a database COMMIT) calls
``crashpoint("<purpose>.<step>")``. Two environment variables drive it:

    IMPRINT_CRASHPOINT=NAME[#N]    the N-th time (default the first) the process reaches NAME,
                                   it sends itself SIGKILL: no cleanup, no finally, no atexit,
                                   exactly what a power cut or the OOM killer leaves behind
    IMPRINT_CRASHPOINT_TRACE=FILE  every point reached is appended to FILE, one name per line,
                                   so a test enumerates the points of a run instead of guessing

Neither set (production): one dictionary lookup per point. Imported on the agent's boot path,
so this module imports nothing beyond os, signal and threading (which the agent loads anyway).
"""

from __future__ import annotations

import os
import signal
import threading

from imprint.safetext import ascii_number

TARGET_ENV = "IMPRINT_CRASHPOINT"
TRACE_ENV = "IMPRINT_CRASHPOINT_TRACE"

_reached: dict[str, int] = {}
_lock = threading.Lock()  # the agent reaches points from its connection threads


def crashpoint(name: str) -> None:
    """Mark the durable step ``name``; die here by SIGKILL if the environment asks for it."""
    target = os.environ.get(TARGET_ENV)
    trace = os.environ.get(TRACE_ENV)
    if not target and not trace:
        return
    with _lock:
        count = _reached[name] = _reached.get(name, 0) + 1
        if trace:
            _append(trace, name)
    if target and _matches(target, name, count):
        os.kill(os.getpid(), signal.SIGKILL)


def _matches(target: str, name: str, count: int) -> bool:
    wanted, sep, nth = target.rpartition("#")
    if not sep or not ascii_number(nth):
        wanted, nth = target, "1"
    return wanted == name and count == int(nth)


def _append(trace: str, name: str) -> None:
    # One write(2) per line with O_APPEND: lines of several processes or threads never interleave.
    fd = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (name.replace("\n", " ") + "\n").encode())
    finally:
        os.close(fd)
