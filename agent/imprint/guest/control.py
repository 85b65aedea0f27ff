"""The pinned control channel: HTTP/1.1 over mutual TLS, only ever reached by the pinned owner.

A small bounded HTTP/1.1 reader instead of http.server: http.server pulls in the email package
(about 13 ms of import inside the first request and 1.3 MiB of resident memory in the agent)
and writes headers and body separately, which costs a delayed-ACK round on every reply.

Each request has one overall deadline, from the end of the previous reply to the last byte of
the request, and its reply another; the listener's reaper enforces them from outside this
thread, so a peer that trickles a byte at a time gets no longer than one that sends nothing.
While the agent works on a request (an apply may take minutes) there is no deadline: only the
pinned owner gets this far, and cutting the socket would not stop the work, only lose its answer.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

from imprint import timeouts
from imprint.guest import log as agent_log
from imprint.guest.state import DELEGATE_ROLES

log = agent_log.get("imprint.agent")

MAX_LINE = 4096
MAX_HEADERS = 64
MAX_BODY = 1 << 20
REQUEST_DEADLINE = timeouts.seconds("IMPRINT_AGENT_REQUEST_SECONDS", 30.0)  # waiting for the next request, reading it
REPLY_DEADLINE = 30.0  # for the peer to take the whole reply
_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 413: "Payload Too Large", 500: "Internal Server Error"}


class ControlBackend(Protocol):
    def status(self) -> dict[str, object]: ...

    def apply(self, backends: dict[str, Any]) -> dict[str, Any]: ...

    def session_counter(self) -> int: ...

    def release(self, wipe: bool) -> dict[str, Any]: ...

    def transfer(self, owner_cert_pem: str, owner_addresses: list[str] | None) -> dict[str, Any]: ...

    def grant(self, cert_pem: str, role: str) -> dict[str, Any]: ...

    def revoke(self, fingerprint: str) -> dict[str, Any]: ...

    def restart_if_due(self) -> None:
        """After a reply that changed who the owner is: start again as a new process."""
        ...

    def advance_session(self, proposed: int) -> tuple[int, int]:
        """The session counter before and after the owner's ``proposed`` (never lower)."""
        ...


# Clone and rollback detection (docs/protocol.md §4.7): the owner proposes the next session
# counter with each request, with the lowest counter it has confirmed; the agent answers with
# its counter before and after. A VM whose counter is below what the owner confirmed is a
# copy, or was restored from an old snapshot: it refuses the request (409) unworked.
SESSION_HEADER = "imprint-session"
_MAX_COUNTER = 10**15


def _session(backend: ControlBackend, headers: dict[str, str]) -> tuple[str | None, bool]:
    """The answer's Imprint-Session value (None when the owner sent none) and whether the
    request must be refused as coming to a stale copy. BadRequest when malformed."""
    value = headers.get(SESSION_HEADER)
    if value is None:
        return None, False
    parts = value.split()
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 15 for p in parts):
        raise BadRequest(400, "Imprint-Session must be two decimal counters: PROPOSED CONFIRMED")
    proposed, confirmed = int(parts[0]), int(parts[1])
    if confirmed >= proposed or proposed > _MAX_COUNTER:
        raise BadRequest(400, "Imprint-Session: the proposed counter must be above the confirmed one")
    current = backend.session_counter()
    if current < confirmed:  # stale: not advanced, so a restored snapshot stays recognisable
        return f"{current} {current}", True
    before, after = backend.advance_session(proposed)
    return f"{before} {after}", False


class Deadline(Protocol):
    def limit(self, seconds: float | None, why: str, *, idle: bool = False) -> None:
        """From now the connection may last ``seconds`` more (None: no limit); ``idle``: it is
        only waiting for the owner's next request and may make room for a newer connection."""


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


Route = Callable[[ControlBackend, dict[str, Any] | None], dict[str, Any]]


def _status(backend: ControlBackend, body: dict[str, Any] | None) -> dict[str, Any]:
    return dict(backend.status())


def _apply(backend: ControlBackend, body: dict[str, Any] | None) -> dict[str, Any]:
    """{"backends": {name: config}} -> {"results": {name: result}}; see imprint.backends."""
    backends = (body or {}).get("backends")
    if not isinstance(backends, dict) or not backends:
        raise BadRequest(400, 'the body must be {"backends": {name: config, ...}} with at least one backend')
    if set(body or {}) != {"backends"}:
        raise BadRequest(400, f"unknown key(s) in the body: {', '.join(sorted(set(body or {}) - {'backends'}))}")
    return backend.apply(backends)


def _only(body: dict[str, Any] | None, allowed: set[str]) -> dict[str, Any]:
    document = body or {}
    unknown = set(document) - allowed
    if unknown:
        raise BadRequest(400, f"unknown key(s) in the body: {', '.join(sorted(unknown))}")
    return document


def _release(backend: ControlBackend, body: dict[str, Any] | None) -> dict[str, Any]:
    """{"wipe": bool} -> the VM forgets its owner (and with wipe its own key); it restarts unbound."""
    wipe = _only(body, {"wipe"}).get("wipe", False)
    if not isinstance(wipe, bool):
        raise BadRequest(400, "wipe must be true or false")
    return backend.release(wipe)


def _transfer(backend: ControlBackend, body: dict[str, Any] | None) -> dict[str, Any]:
    """{"owner_cert": PEM, "owner_addresses"?: [HOST:PORT]} -> the VM's owner is the new one."""
    document = _only(body, {"owner_cert", "owner_addresses"})
    cert, addresses = document.get("owner_cert"), document.get("owner_addresses")
    if not isinstance(cert, str) or len(cert) > 4096:
        raise BadRequest(400, "owner_cert must be the new owner's certificate (PEM)")
    if addresses is not None and not (isinstance(addresses, list) and all(isinstance(a, str) for a in addresses)):
        raise BadRequest(400, "owner_addresses must be a list of HOST:PORT strings")
    return backend.transfer(cert, addresses)


def _grant(backend: ControlBackend, body: dict[str, Any] | None) -> dict[str, Any]:
    """{"cert": PEM, "role": read|operator|admin} -> that principal may reach this VM in that role."""
    document = _only(body, {"cert", "role"})
    cert, role = document.get("cert"), document.get("role")
    if not isinstance(cert, str) or len(cert) > 4096:
        raise BadRequest(400, "cert must be the delegate's certificate (PEM)")
    if role not in DELEGATE_ROLES:
        raise BadRequest(400, f"role must be one of {', '.join(DELEGATE_ROLES)}")
    return backend.grant(cert, role)


def _revoke(backend: ControlBackend, body: dict[str, Any] | None) -> dict[str, Any]:
    """{"fingerprint": SHA256:...} -> that delegate is refused from now on, at the TLS layer."""
    fingerprint = _only(body, {"fingerprint"}).get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint.startswith("SHA256:") or len(fingerprint) > 100:
        raise BadRequest(400, "fingerprint must be a key fingerprint, SHA256:...")
    return backend.revoke(fingerprint)


# Who may do what (docs/protocol.md §4.9): the lowest first; each may do what those before may.
ROLES = (*DELEGATE_ROLES, "owner")

# (method, path) -> (handler, the least role that may call it); the one place endpoints are registered.
ROUTES: dict[tuple[str, str], tuple[Route, str]] = {
    ("GET", "/v1/status"): (_status, "read"),
    ("POST", "/v1/apply"): (_apply, "operator"),
    ("POST", "/v1/grant"): (_grant, "admin"),
    ("POST", "/v1/revoke"): (_revoke, "admin"),
    ("POST", "/v1/release"): (_release, "owner"),
    ("POST", "/v1/transfer"): (_transfer, "owner"),
}


def _readline(rfile: BinaryIO) -> bytes:
    line = rfile.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise BadRequest(400, "header line too long")
    return line


def _read_request(rfile: BinaryIO) -> tuple[str, str, dict[str, str], bytes] | None:
    line = _readline(rfile)
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    method, path, _version = parts
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        raw = _readline(rfile)
        if raw in (b"\r\n", b"\n", b""):
            break
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep:
            raise BadRequest(400, "malformed header")
        headers[name.strip().lower()] = value.strip()
    else:
        raise BadRequest(400, "too many headers")
    if "transfer-encoding" in headers:
        raise BadRequest(400, "chunked bodies are not accepted; send Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise BadRequest(400, "Content-Length is not a number") from None
    if length < 0 or length > MAX_BODY:
        raise BadRequest(413, f"body over {MAX_BODY} bytes")
    body = rfile.read(length) if length else b""
    if len(body) != length:
        raise BadRequest(400, "body truncated")
    return method, path, headers, body


def _response(status: int, payload: dict[str, Any], *, close: bool, session: str | None = None) -> bytes:
    data = json.dumps(payload, sort_keys=True).encode()
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nServer: imprint-agent\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            + (f"Imprint-Session: {session}\r\n" if session is not None else "")
            + f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n")
    return head.encode() + data  # one write: no delayed-ACK stall between headers and body


def _dispatch(backend: ControlBackend, method: str, path: str, body: bytes,
              role: str = "owner") -> tuple[int, dict[str, Any]]:
    entry = ROUTES.get((method, path))
    if entry is None:
        if any(p == path for _, p in ROUTES):
            return 405, {"error": f"{method} is not allowed on {path}"}
        return 404, {"error": f"no such endpoint: {path}"}
    route, least = entry
    if ROLES.index(role) < ROLES.index(least):
        return 403, {"error": f"the {role} role may not {method} {path} (it needs {least})"}
    document: dict[str, Any] | None = None
    if body:
        try:
            parsed = json.loads(body)
        except ValueError:
            return 400, {"error": "the body is not JSON"}
        except RecursionError:  # json nests by recursion: a deep body would end in a 500 and a traceback
            return 400, {"error": "the body is nested too deeply"}
        if not isinstance(parsed, dict):
            return 400, {"error": "the body must be a JSON object"}
        document = parsed
    try:
        return 200, route(backend, document)
    except BadRequest as exc:
        return exc.status, {"error": str(exc)}


def serve_control(sock: ssl.SSLSocket, peer: str, backend: ControlBackend, deadline: Deadline,
                  role: str = "owner") -> None:
    rfile = sock.makefile("rb")
    try:
        while True:
            deadline.limit(REQUEST_DEADLINE, f"the next request ({REQUEST_DEADLINE:.0f} s)", idle=True)
            try:
                request = _read_request(rfile)
            except BadRequest as exc:
                deadline.limit(REPLY_DEADLINE, f"the reply ({REPLY_DEADLINE:.0f} s)")
                sock.sendall(_response(exc.status, {"error": str(exc)}, close=True))
                log.info("control %s: refused: %s", peer, exc)
                return
            if request is None:
                return
            method, path, headers, body = request
            deadline.limit(None, "the owner's request")
            session: str | None = None
            try:
                session, stale = _session(backend, headers)
                if stale:
                    status, payload = 409, {"error": "this VM's session counter is below the owner's: it is a copy "
                                                     "of the VM, or was restored from an older snapshot"}
                    log.warning("control %s: refused %s %s: the owner has seen a later session of this VM "
                                "(a copy, or a restored snapshot): counters %s", peer, method, path, session)
                else:
                    status, payload = _dispatch(backend, method, path, body, role)
            except BadRequest as exc:
                status, payload = exc.status, {"error": str(exc)}
            except Exception:
                log.exception("control %s: %s %s failed", peer, method, path)
                status, payload = 500, {"error": "internal error in the agent; see its log"}
            close = headers.get("connection", "").lower() == "close"
            deadline.limit(REPLY_DEADLINE, f"the reply ({REPLY_DEADLINE:.0f} s)")
            sock.sendall(_response(status, payload, close=close, session=session))
            log.info("control %s: %s %s -> %d", peer, method, path, status)
            backend.restart_if_due()  # a release or transfer: the reply is out, the process starts again
            if close:
                return
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        log.info("control connection from %s ended: %s", peer, exc)
    finally:
        rfile.close()
