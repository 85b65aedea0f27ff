"""The pinned control channel: HTTP/1.1 over mutual TLS, only ever reached by the pinned owner."""

from __future__ import annotations

import json
import logging
import ssl
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol

log = logging.getLogger("imprint.agent")


class ControlBackend(Protocol):
    def status(self) -> dict[str, object]: ...


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "imprint-agent"
    sys_version = ""
    backend: ControlBackend
    peer: str

    def do_GET(self) -> None:
        if self.path == "/v1/status":
            self._reply(HTTPStatus.OK, self.backend.status())
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {self.path}"})

    def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body, sort_keys=True).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("control %s: " + format, self.peer, *args)


def serve_control(sock: ssl.SSLSocket, peer: str, backend: ControlBackend) -> None:
    handler = type("Handler", (_Handler,), {"backend": backend, "peer": peer})
    try:
        handler(sock, (peer, 0), None)
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        log.info("control connection from %s ended: %s", peer, exc)
