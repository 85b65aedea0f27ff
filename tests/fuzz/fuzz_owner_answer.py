"""The owner's reader of a VM's HTTP answers (owner/client.py), on an arbitrary byte stream.

Every answer the owner reads from a bound VM (on the bind's connection, or on a new pinned
connection) goes through ``_AnswerReader`` and ``_decode``: a compromised VM chooses these bytes.
The first byte says how the rest arrives (the size of each read, as the frames target does), so
an answer split at any point is tried. Only BadAnswer, RemoteDisconnected (nothing at all before
the end) and, from ``_decode``, Unreachable (or UsageError for a 403: a delegate's role does not
reach the request) may leave; what is accepted is bounded and whole.
"""

from __future__ import annotations

import http.client
import time

from imprint.owner import client
from imprint.owner.errors import Unreachable, UsageError

FLAGS = ["-max_len=20000"]


class _Stream:
    """What the reader needs of a socket: recv in pieces of a chosen size, then the end."""

    def __init__(self, data: bytes, piece: int) -> None:
        self._data, self._piece, self._at = data, piece, 0

    def settimeout(self, value: float | None) -> None:
        assert value is not None and value > 0, value

    def recv(self, size: int) -> bytes:
        chunk = self._data[self._at:self._at + min(size, self._piece)]
        self._at += len(chunk)
        return chunk


def test_one_input(data: bytes) -> None:
    if not data:
        return
    stream = _Stream(data[1:], 1 + data[0] * 64)
    reader = client._AnswerReader(stream, time.monotonic() + 60, time.monotonic)  # type: ignore[arg-type]
    try:
        status, body = reader.answer()
    except (client.BadAnswer, http.client.RemoteDisconnected):
        return
    assert 0 <= status <= 999, status
    assert len(body) <= client.MAX_ANSWER
    head = data[1:].split(b"\r\n\r\n", 1)[0]
    assert len(head) <= client.MAX_HEAD
    try:
        answer = client._decode(status, body, "GET /v1/status", "127.0.0.1:7443")
    except Unreachable:
        assert status != 200 or not isinstance(client._json(body), dict), "a 200 with a JSON object refused"
        return
    except UsageError:
        assert status == 403, status
        return
    assert status == 200 and isinstance(answer, dict)
