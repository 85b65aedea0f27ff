"""The VM's own append-only record of what happened to its trust: <state>/journal.log.

One JSON object per line: ``{"n": sequence, "at": unix time, "event": name, ...fields,
"prev": SHA-256 hex of the previous line}``. Lines are only ever appended (O_APPEND, one write
per line, fsync), and each names the hash of the one before, so an edited, removed or
reordered line breaks the chain where it was changed, and :func:`verify` says where. It holds
fingerprints and token ids, never a key or K. Events: ``bound`` (owner fingerprint, mode, how
the owner was reached: "dial-in" or "dial-out"), ``released`` (wipe), ``transferred`` (the new
owner's fingerprint). It is one owner's record: a transfer starts a new journal, since the VM
keeps nothing of its old owner.

A crash half-way through an append leaves a last line without its newline: ``verify`` reports
it, and the next append starts a new line after it, so the chain stays checkable up to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
MAX_LINE = 4096
_lock = threading.Lock()


class JournalBroken(Exception):
    """The journal's chain does not hold: a line was changed, removed or is not one of ours."""


@dataclass(frozen=True)
class Entry:
    n: int
    at: float
    event: str
    fields: dict[str, Any]
    line_sha256: str


def _digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def read(path: Path) -> list[Entry]:
    """Every entry, checked link by link; JournalBroken names the first line that breaks it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    entries: list[Entry] = []
    prev, expected_n = GENESIS, 1
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if len(line) > MAX_LINE:
            raise JournalBroken(f"{path} line {number}: longer than {MAX_LINE} bytes")
        try:
            data = json.loads(line)
        except (ValueError, RecursionError):
            raise JournalBroken(f"{path} line {number}: not a JSON line (cut short by a crash, or not ours)"
                                ) from None
        if not isinstance(data, dict) or data.get("prev") != prev or data.get("n") != expected_n \
                or not isinstance(data.get("event"), str) or not isinstance(data.get("at"), int | float):
            raise JournalBroken(f"{path} line {number}: does not follow the line before it (changed, removed "
                                "or reordered)")
        fields = {k: v for k, v in data.items() if k not in ("n", "at", "event", "prev")}
        digest = _digest(line)
        entries.append(Entry(expected_n, float(data["at"]), data["event"], fields, digest))
        prev, expected_n = digest, expected_n + 1
    return entries


def append(path: Path, event: str, **fields: Any) -> Entry:
    """Append one event (after checking the chain it extends) and sync it to disk."""
    with _lock:
        try:
            entries = read(path)
        except JournalBroken:
            entries = None  # appended after the break: the break stays visible to verify()
        if entries is None:
            last_n, prev = _last_link(path)
        else:
            last_n, prev = (entries[-1].n, entries[-1].line_sha256) if entries else (0, GENESIS)
        record = {"n": last_n + 1, "at": round(time.time(), 3), "event": event, **fields, "prev": prev}
        line = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        if len(line) > MAX_LINE:
            raise ValueError(f"journal entry {event} is longer than {MAX_LINE} bytes")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            size = os.fstat(fd).st_size
            head = b""
            if size:
                with path.open("rb") as reader:
                    reader.seek(size - 1)
                    head = b"" if reader.read(1) == b"\n" else b"\n"  # after a torn line, a line of our own
            os.write(fd, head + line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return Entry(record["n"], record["at"], event, fields, _digest(line))


def _last_link(path: Path) -> tuple[int, str]:
    """After a break: the sequence number and hash of the last whole line, to go on from."""
    last = path.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        n = int(json.loads(last).get("n", 0))
    except (ValueError, AttributeError, TypeError, RecursionError):
        n = 0
    return n, _digest(last)
