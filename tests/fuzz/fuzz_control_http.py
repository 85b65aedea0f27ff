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

    # The rest of the ControlBackend protocol: what each route gets once its body passed.
    def session_counter(self) -> int:
        return 0

    def advance_session(self, proposed: int) -> tuple[int, int]:
        return 0, proposed

    def release(self, wipe: bool) -> dict[str, Any]:
        return {"released": True, "wiped": wipe}

    def transfer(self, owner_cert_pem: str, owner_addresses: list[str] | None) -> dict[str, Any]:
        return {"transferred": True}

    def grant(self, cert_pem: str, role: str) -> dict[str, Any]:
        return {"granted": True, "role": role}

    def revoke(self, fingerprint: str) -> dict[str, Any]:
        return {"revoked": True}

    def restart_if_due(self) -> None:
        return None


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
        try:
            control._session(_BACKEND, headers)  # the Imprint-Session header, hostile too
        except control.BadRequest as exc:
            assert exc.status == 400, exc.status
        status, payload = control._dispatch(_BACKEND, method, path, body, role="read")
        assert status in (200, 400, 403, 404, 405, 413), status
        status, payload = control._dispatch(_BACKEND, method, path, body)
        assert status in (200, 400, 404, 405, 413), status
        json.loads(control._response(status, payload, close=True).split(b"\r\n\r\n", 1)[1])
