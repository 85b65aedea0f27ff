"""Requests to a bound VM over mutual TLS, pinned to the VM certificate recorded at bind time.

A compromised VM holds the pinned key, so what it answers is hostile input like any other: it
can trickle an answer a byte at a time or send one without end. So every request has one
deadline for all of it (connect, TLS, the request, the whole answer), kept in the thread that
waits: each blocking call gets only what remains of it (the ssl module bounds a whole handshake
or read by its timeout, not each byte). An answer is read whole, at most MAX_HEAD bytes of head
and MAX_ANSWER of body, framed by Content-Length, never chunked, compressed or redirected,
before anyone looks at it. The same reader serves the bind's own connection (``ask_on``), so
there is one HTTP client for the pinned channel, and no third-party one: no proxy from the
environment, no redirect, no connection pool, nothing imported but the standard library.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from imprint import timeouts, tls
from imprint.owner.errors import AuthenticationFailed, Unreachable, UsageError
from imprint.owner.home import OwnerHome
from imprint.owner.names import split_address
from imprint.owner.sessions import SessionCheck
from imprint.owner.store import Store
from imprint.owner.tlsfailures import owner_error
from imprint.safetext import ascii_number, printable

# Seconds for a whole request and its answer, unless the caller gives another.
TIMEOUT = timeouts.seconds("IMPRINT_OWNER_REQUEST_SECONDS", 10.0)
MAX_ANSWER = 1 << 20  # bytes of an answer's body: /v1/status is ~300 bytes, an apply's results a few KiB
_READ_CHUNK = 64 * 1024
Clock = Callable[[], float]


class BadAnswer(Exception):
    """An answer the pinned channel does not read: too large, or framed as the agent never frames one."""


class PinnedClient:
    """Requests to ``vm`` at ``address``, trusting ``pin`` alone: it is the context's one trust
    anchor, and the certificate the handshake showed must also be the pin's exact bytes. Each
    request has a connection of its own (no pool: it proves the pinned key afresh and holds
    none of the agent's owner slots idle)."""

    def __init__(self, home: OwnerHome, vm: str, pin: tls.PinnedCert, address: str,
                 store: Store | None = None) -> None:
        self.address = address
        self.vm = vm
        # With the record: every request carries the session counters (owner/sessions.py).
        self._sessions = SessionCheck(store, vm) if store is not None else None
        self._host, self._port = split_address(address)
        self._pin = pin
        self._home_dir = home.dir
        self._context = tls.owner_pinned_context(str(home.cert_file), str(home.key_file), pin)
        home.write_pin_file(vm, pin.pem)  # the copy an owner's own tools can use (openssl s_client -CAfile)

    def get(self, path: str, *, timeout: float = TIMEOUT) -> dict[str, Any]:
        return self._request("GET", path, None, timeout=timeout)

    def post(self, path: str, body: dict[str, Any], *, timeout: float = TIMEOUT) -> dict[str, Any]:
        return self._request("POST", path, json.dumps(body, sort_keys=True).encode(), timeout=timeout)

    def close(self) -> None:
        """Nothing is held between requests; kept for the callers' ``finally``."""

    def _request(self, method: str, path: str, body: bytes | None, *, timeout: float,
                 clock: Clock = time.monotonic) -> dict[str, Any]:
        """``timeout``: seconds for the whole request and answer, not per read."""
        what = f"{method} {path}"
        from imprint.owner import viaserve

        session = None
        if self._sessions is not None:
            if method != "GET" and (state := self._sessions.flagged()) is not None:
                raise AuthenticationFailed(f"{self.vm} is flagged {state} (a copy of it, or a restored snapshot, "
                                           f"answered): nothing is sent to it until you decide "
                                           f"(`imprint resolve {self.vm}`)")
            session = self._sessions.propose()
        through = viaserve.request(self._home_dir, self.vm, method, path, body, timeout, session)
        if through is not None:  # the VM dialled the owner's listener: its connection is there
            status, answer, peer, answered = through
            self.address = f"{peer} (dialled in)"
            if self._sessions is not None:
                self._sessions.settle(answered, self.address)
            return _decode(status, answer, what, self.address)
        deadline = clock() + timeout
        try:
            sock = self._connect(deadline, clock)
        except TimeoutError:
            raise Unreachable(_late(what, "over the pinned channel", self.address, timeout)) from None
        except OSError as exc:  # ssl.SSLError (and tls.PinMismatch) included
            raise owner_error(exc, self.address, f"{what} over the pinned channel") from None
        with sock:
            status, answer, answered = _exchange(sock, method, path, body, self.address, "over the pinned channel",
                                                 timeout, deadline, clock, session)
        if self._sessions is not None:
            self._sessions.settle(answered, self.address)
        return _decode(status, answer, what, self.address)

    def _connect(self, deadline: float, clock: Clock) -> ssl.SSLSocket:
        raw = socket.create_connection((self._host, self._port), timeout=_remaining(deadline, clock))
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self._context.wrap_socket(raw, do_handshake_on_connect=False)
        except BaseException:
            raw.close()
            raise
        try:
            sock.settimeout(_remaining(deadline, clock))
            sock.do_handshake()  # bounded as a whole by the timeout (the ssl module keeps a deadline)
            self._pin.verify_exact(sock)
        except BaseException:
            sock.close()
            raise
        return sock


def ask_on(sock: ssl.SSLSocket, method: str, path: str, address: str, *, timeout: float = TIMEOUT,
           clock: Clock = time.monotonic) -> dict[str, Any]:
    """One bodiless request on a connection that is already the pinned channel: the bind's
    own, once its exchange completed (docs/protocol.md §4.4), so no second handshake. The
    rules of PinnedClient: ``timeout`` seconds for the request and its whole answer."""
    return _ask(sock, method, path, None, address, "on the bind's connection", timeout, clock() + timeout, clock)


class Answer(NamedTuple):
    status: int
    body: bytes
    session: str | None  # the agent's Imprint-Session answer, if it sent one


def exchange_on(sock: ssl.SSLSocket, method: str, path: str, body: bytes | None, *, timeout: float,
                keep_alive: bool, session: str | None = None, clock: Clock = time.monotonic) -> Answer:
    """One request on a pinned connection and its raw answer, read by the rules of
    PinnedClient; the connection stays open for the next when ``keep_alive``. ``session``: the
    Imprint-Session value to send (docs/protocol.md §4.7). Raises TimeoutError, BadAnswer or
    OSError: the callers name the failure."""
    deadline = clock() + timeout
    head = f"{method} {path} HTTP/1.1\r\nHost: imprint\r\nAccept-Encoding: identity\r\n"
    if session is not None:
        if not all(part.isascii() and part.isdigit() for part in session.split()):
            raise ValueError("an Imprint-Session value is decimal counters")
        head += f"Imprint-Session: {session}\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    head += f"Content-Length: {len(body or b'')}\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    sock.settimeout(_remaining(deadline, clock))
    sock.sendall(head.encode() + (body or b""))  # one write: no delayed-ACK stall between head and body
    reader = _AnswerReader(sock, deadline, clock)
    status, answer = reader.answer()
    return Answer(status, answer, reader.headers.get("imprint-session"))


def decode_answer(status: int, body: bytes, what: str, address: str) -> dict[str, Any]:
    """An answer's JSON object, or Unreachable naming what the agent answered instead."""
    return _decode(status, body, what, address)


def _ask(sock: ssl.SSLSocket, method: str, path: str, body: bytes | None, address: str, where: str,
         timeout: float, deadline: float, clock: Clock) -> dict[str, Any]:
    status, answer, _ = _exchange(sock, method, path, body, address, where, timeout, deadline, clock, None)
    return _decode(status, answer, f"{method} {path}", address)


def _exchange(sock: ssl.SSLSocket, method: str, path: str, body: bytes | None, address: str, where: str,
              timeout: float, deadline: float, clock: Clock, session: str | None) -> Answer:
    what = f"{method} {path}"
    try:
        return exchange_on(sock, method, path, body, timeout=_remaining(deadline, clock),
                           keep_alive=False, session=session, clock=clock)
    except TimeoutError:
        raise Unreachable(_late(what, where, address, timeout)) from None
    except BadAnswer as exc:
        raise Unreachable(f"the agent at {address} answered {what} with {exc}") from None
    except OSError as exc:  # ssl.SSLError included
        raise owner_error(exc, address, f"{what} {where}") from None


def _late(what: str, where: str, address: str, timeout: float) -> str:
    return (f"{what} {where}: the agent at {address} did not answer within {timeout:g} s "
            "(the deadline for the whole answer)")


def _remaining(deadline: float, clock: Clock) -> float:
    remaining = deadline - clock()
    if remaining <= 0:
        raise TimeoutError
    return remaining


def _decode(status: int, body: bytes, what: str, address: str) -> dict[str, Any]:
    data = _json(body)
    if status == 403:  # a delegate's role does not reach this request: the VM said so
        error = data.get("error") if isinstance(data, dict) else None
        raise UsageError(f"the agent at {address} refused {what}: {str(error)[:300]}")
    if status != 200:
        error = data.get("error") if isinstance(data, dict) else None
        raise Unreachable(f"the agent at {address} answered {status} to {what}"
                          + (f": {str(error)[:300]}" if error else ""))
    if not isinstance(data, dict):
        raise Unreachable(f"the agent at {address} answered {what} with something other than a JSON object")
    return data


MAX_HEAD = 16 * 1024  # the agent's status line and headers are ~150 bytes


class _AnswerReader:
    def __init__(self, sock: ssl.SSLSocket, deadline: float, clock: Clock) -> None:
        self._sock, self._deadline, self._clock = sock, deadline, clock
        self._data = bytearray()
        self.headers: dict[str, str] = {}

    def _more(self) -> bool:
        self._sock.settimeout(_remaining(self._deadline, self._clock))
        chunk = self._sock.recv(_READ_CHUNK)
        self._data += chunk
        return bool(chunk)

    def answer(self) -> tuple[int, bytes]:
        while (end := self._data.find(b"\r\n\r\n")) < 0:
            if len(self._data) > MAX_HEAD:
                raise BadAnswer(f"a head longer than {MAX_HEAD} bytes")
            if not self._more():
                if not self._data:  # the transport's failure, not a malformed answer
                    raise http.client.RemoteDisconnected("the connection closed before the agent answered")
                raise BadAnswer("an answer cut short in its head")
        if end > MAX_HEAD:
            raise BadAnswer(f"a head longer than {MAX_HEAD} bytes")
        lines = bytes(self._data[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not (len(parts[1]) == 3
                                                                        and ascii_number(parts[1], 3)):
            raise BadAnswer(f"a malformed status line ({printable(lines[0], 60)})")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadAnswer(f"a malformed header line ({printable(line, 60)})")
            headers[name.strip().lower()] = value.strip()
        self.headers = headers
        if "transfer-encoding" in headers or headers.get("content-encoding", "identity").lower() != "identity":
            raise BadAnswer("a chunked or compressed body, which the agent never sends")
        length = headers.get("content-length")
        if length is None:
            raise BadAnswer("a body without Content-Length, which the agent always sends")
        if not (ascii_number(length) and int(length) <= MAX_ANSWER):
            raise BadAnswer(f"a body of {printable(length, 40)} bytes (at most {MAX_ANSWER} are read)")
        body_start, size = end + 4, int(length)
        while len(self._data) - body_start < size:
            if not self._more():
                raise BadAnswer(f"the connection closed {len(self._data) - body_start} bytes into a body of {size}")
        if len(self._data) - body_start > size:
            raise BadAnswer("more bytes than its Content-Length")
        return int(parts[1]), bytes(self._data[body_start:])


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: json nests by recursion, a VM can nest deep
        return None
