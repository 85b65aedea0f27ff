"""The control channel's HTTP/1.1 reader (guest/control.py) on an arbitrary byte stream.

Requests are read from a BytesIO the way serve_control reads them from the TLS socket, until the
end of the stream or the first refusal, and each is dispatched to a stand-in backend. Only
BadRequest may leave the reader, and dispatch answers every request with a status and a JSON
document (it has no refusal of its own to raise).
"""

from __future__ import annotations

import io
import json
from typing import Any

from imprint.guest import control

FLAGS = ["-max_len=8192"]


class _Backend:
    def status(self) -> dict[str, object]:
        return {"bound": True}

    def apply(self, backends: dict[str, Any]) -> dict[str, Any]:
        return {"results": {name: {"ok": True, "changed": False} for name in backends}}


_BACKEND = _Backend()


def test_one_input(data: bytes) -> None:
    rfile = io.BytesIO(data)
    while True:
        try:
            request = control._read_request(rfile)
        except control.BadRequest as exc:
            assert 400 <= exc.status < 500, exc.status
            return
        if request is None:
            return
        method, path, headers, body = request
        assert len(body) <= control.MAX_BODY
        status, payload = control._dispatch(_BACKEND, method, path, body)
        assert status in (200, 400, 404, 405, 413), status
        json.loads(control._response(status, payload, close=True).split(b"\r\n\r\n", 1)[1])
