"""``imprint-site reverse``: the VM token from a console log or a metadata disk's reply area.

The console is shared by everything in the VM that writes to it (the kernel, systemd, other
services, and a local user who can write to a console tty), so the reading is strict: only
whole lines that are exactly the agent's announcement count (:func:`imprint.tokens.parse_vm_token_line`),
and any two announcements that disagree, or one answering another owner token than the VM was
booted with, are a refusal, never a choice: a forger can make the relay fail, not pick the token.
The log is read line by line with a bound per line, so a VM that floods its console costs the
site time, not memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from imprint import metadisk, tokens

MAX_LINE_BYTES = 4096  # far above an announcement; longer lines are skipped, never buffered whole
MAX_METADISK_BYTES = 1 << 20


class ReverseError(Exception):
    """No VM token could be extracted yet (the message says why)."""


class Refused(ReverseError):
    """Announcements that contradict each other or the owner token: no token is chosen."""


def _lines(stream: BinaryIO) -> Iterator[str]:
    while True:
        line = stream.readline(MAX_LINE_BYTES)
        if not line:
            return
        if not line.endswith(b"\n") and len(line) == MAX_LINE_BYTES:
            while (rest := stream.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass  # the rest of an overlong line: not an announcement, not kept
            continue
        yield line.rstrip(b"\n").decode("utf-8", "replace")


def _metadisk_text(path: Path, data: bytes) -> str:
    try:
        header = metadisk.decode_header(data)
        end = header.reply_offset + header.reply_size
        if end > len(data):
            raise metadisk.MetadiskError(f"the reply area ends at {end}, beyond the disk's {len(data)} bytes")
        payload = metadisk.decode_reply(data[header.reply_offset:end])
    except metadisk.MetadiskError as exc:
        raise ReverseError(f"{path}: metadata disk: {exc}") from None
    if payload is None:
        raise ReverseError(f"{path}: the VM has not written its VM token to the reply area yet")
    return payload


def announcements(path: Path) -> list[tokens.Announcement]:
    """Every announcement in ``path`` (a console log, or a metadata disk image), in order."""
    try:
        with path.open("rb") as stream:
            # peek, not seek: a console can be a pipe or a FIFO the site's serial port feeds.
            if stream.peek(len(metadisk.MAGIC)).startswith(metadisk.MAGIC):
                text = _metadisk_text(path, stream.read(MAX_METADISK_BYTES))
                return tokens.find_vm_token_announcements(text)
            return [a for line in _lines(stream) if (a := tokens.parse_vm_token_line(line)) is not None]
    except OSError as exc:
        raise ReverseError(f"cannot read {path}: {exc.strerror or exc}") from None


def choose(found: list[tokens.Announcement], where: str, answers: str | None = None) -> tokens.Token:
    """The one VM token ``found`` agrees on; ``answers``: the owner token id (hex) the VM was
    booted with, which the announcement must name."""
    if not found:
        raise ReverseError(f"{where}: no '{tokens.VM_TOKEN_LINE_PREFIX} <token>' line with a valid VM token")
    distinct = {a.token.payload for a in found}
    if len(distinct) > 1:
        raise Refused(f"{where}: {len(distinct)} different VM tokens announced; refusing to guess "
                      "(something other than the agent writes announcement lines to this console)")
    if answers is not None:
        other = sorted({a.answers for a in found if a.answers is not None and a.answers != answers})
        if other:
            raise Refused(f"{where}: the VM announces its token for owner token id {', '.join(other)}, "
                          f"but it was booted with {answers}; refusing")
        if not any(a.answers == answers for a in found):
            raise ReverseError(f"{where}: no announcement names owner token id {answers} (an agent "
                               "older than this site writes none; use `imprint-site reverse` without --for)")
    return found[-1].token


def extract(path: Path, *, answers: str | None = None) -> tokens.Token:
    return choose(announcements(path), str(path), answers)
