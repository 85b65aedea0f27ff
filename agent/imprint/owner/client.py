"""Requests to a bound VM over mutual TLS, pinned to the VM certificate recorded at bind time.

A compromised VM holds the pinned key, so what it answers is hostile input like any other: it
can trickle an answer a byte at a time, which requests' timeout (per socket read) never ends,
or send one without end. So every request has one deadline for all of it (connect, TLS, the
request, the whole answer), and an answer is read whole, up to MAX_ANSWER bytes, before anyone
looks at it.
"""

from __future__ import annotations

import contextvars
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool

from imprint import timeouts, tls
from imprint.owner.errors import Unreachable
from imprint.owner.home import OwnerHome
from imprint.owner.tlsfailures import owner_error
from imprint.safetext import printable

# Seconds for a whole request and its answer, unless the caller gives another.
TIMEOUT = timeouts.seconds("IMPRINT_OWNER_REQUEST_SECONDS", 10.0)
MAX_ANSWER = 1 << 20  # bytes of an answer's body: /v1/status is ~300 bytes, an apply's results a few KiB
_READ_CHUNK = 64 * 1024


class DeadlinePassed(requests.exceptions.Timeout):
    """The request and its whole answer did not finish within the deadline."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no complete answer within {seconds:g} s")
        self.seconds = seconds


class BadAnswer(requests.exceptions.RequestException):
    """An answer the pinned channel does not read: too large, or framed as the agent never frames one."""


class _Deadline:
    """One request's deadline, kept by a timer thread: the thread that waits on the peer cannot
    keep it (urllib3 gives it a timeout per socket operation, no clock). When it passes, every
    socket opened under it is shut down, which ends a blocked connect, handshake, send or read
    at once, with an error."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    @property
    def passed(self) -> bool:
        return self._expired or time.monotonic() >= self._end

    def watch(self, sock: socket.socket) -> None:
        # A duplicate descriptor: the ssl module detaches urllib3's socket object when it wraps
        # it, and a bare number may be reused by then; a shutdown through either ends the connection.
        duplicate = sock.dup()
        with self._lock:
            self._sockets.append(duplicate)
            if self._expired:
                _shut(duplicate)

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            for sock in self._sockets:
                _shut(sock)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:  # never while _expire shuts them down
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer or by urllib3


# urllib3 builds pools and connections itself, from keyword arguments it checks; a request runs
# in the thread that sends it, so the context carries its deadline to where each socket is born.
# Unset outside PinnedAdapter.send: a connection opened there fails (LookupError), not unwatched.
_DEADLINE: contextvars.ContextVar[_Deadline] = contextvars.ContextVar("imprint_pinned_deadline")


class _WatchedConnection(HTTPSConnection):
    """urllib3's connection, handing each socket to the request's deadline as soon as it is
    connected: before TLS, so a trickled handshake ends at the deadline too."""

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]  # not in types-urllib3 1.26
        try:
            _DEADLINE.get().watch(sock)
        except BaseException:
            sock.close()
            raise
        return sock


class _WatchedPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedConnection


class PinnedAdapter(HTTPAdapter):
    """The pinned channel's transport. Trusts exactly one certificate: the context's only CA is
    the pin, hostnames are not checked (the identity is the key), and urllib3 compares the
    certificate fingerprint too. Each request gets a connection of its own, one deadline for
    all of it (its ``timeout``; TIMEOUT when that is None or a pair) and a body of at most
    MAX_ANSWER bytes, read here, whole, before the caller sees the response."""

    def __init__(self, context: ssl.SSLContext, pin: tls.PinnedCert) -> None:
        self._context = context
        self._fingerprint = pin.der_sha256
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(ssl_context=self._context, assert_hostname=False, assert_fingerprint=self._fingerprint)
        super().init_poolmanager(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.poolmanager.pool_classes_by_scheme = {"https": _WatchedPool}  # no plain http at all

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: None | float | tuple[float, float] | tuple[float, None] = None,
             verify: bool | str = True, cert: None | bytes | str | tuple[bytes | str, bytes | str] = None,
             proxies: Mapping[str, str] | None = None) -> requests.Response:
        seconds = float(timeout) if isinstance(timeout, int | float) else TIMEOUT
        deadline = _Deadline(seconds)
        context = _DEADLINE.set(deadline)
        try:
            response = super().send(request, stream=True, timeout=seconds, verify=verify, cert=cert,
                                    proxies=proxies)
            try:
                response._content = _read_answer(response.raw)
            finally:
                response.close()
            if deadline.passed:  # the shutdown may read as the end of the headers or the body: cut short
                raise DeadlinePassed(seconds)
            response._content_consumed = True  # type: ignore[attr-defined]  # in memory: requests reads no more
            return response
        except DeadlinePassed:
            raise
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                OSError) as exc:
            if deadline.passed:  # whatever broke, the deadline broke it (or came first)
                raise DeadlinePassed(seconds) from exc
            if isinstance(exc, requests.exceptions.RequestException):
                raise
            raise requests.exceptions.ConnectionError(exc) from exc  # urllib3's, from reading the body
        finally:
            _DEADLINE.reset(context)
            deadline.close()
            # No connection outlives its request: the next one opens a new one under its own
            # deadline, proves the pinned key afresh, and holds none of the agent's owner slots idle.
            self.poolmanager.clear()


def _read_answer(raw: Any) -> bytes:
    """The body as sent, at most MAX_ANSWER bytes. Never decompressed (a small answer inflates
    without bound) and never chunked (urllib3 1.26 reads a chunk's size line without bound): the
    agent sends neither, it frames every answer with Content-Length (guest/control.py)."""
    headers = raw.headers
    if headers.get("Transfer-Encoding") or headers.get("Content-Encoding", "identity").lower() != "identity":
        raise BadAnswer("a chunked or compressed body, which the agent never sends")
    length = headers.get("Content-Length")
    if length is not None and not (length.isdigit() and int(length) <= MAX_ANSWER):
        raise BadAnswer(f"a body of {printable(length, 40)} bytes (at most {MAX_ANSWER} are read)")
    data = bytearray()
    while len(data) <= MAX_ANSWER:
        chunk = raw.read(min(_READ_CHUNK, MAX_ANSWER + 1 - len(data)), decode_content=False)
        if not chunk:
            break
        data += chunk
    if len(data) > MAX_ANSWER:
        raise BadAnswer(f"a body larger than {MAX_ANSWER} bytes")
    if length is not None and len(data) != int(length):
        raise requests.exceptions.ConnectionError(f"the connection closed {len(data)} bytes into "
                                                  f"a body of {length}")
    return bytes(data)


class PinnedClient:
    """Requests to ``vm`` at ``address``, trusting ``pin`` alone: the context's one trust anchor,
    urllib3's fingerprint check and requests' CA file (the pin file) are all that one pin."""

    def __init__(self, home: OwnerHome, vm: str, pin: tls.PinnedCert, address: str) -> None:
        self.address = address
        self._base = f"https://{address}"
        context = tls.owner_pinned_context(str(home.cert_file), str(home.key_file), pin)
        self._session = requests.Session()
        self._session.trust_env = False  # a proxy from the environment must not sit in this channel
        self._session.verify = str(home.write_pin_file(vm, pin.pem))
        self._session.headers["Accept-Encoding"] = "identity"  # the adapter reads bodies as sent
        self._session.mount("https://", PinnedAdapter(context, pin))

    def get(self, path: str, *, timeout: float = TIMEOUT) -> dict[str, Any]:
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, body: dict[str, Any], *, timeout: float = TIMEOUT) -> dict[str, Any]:
        return self._request("POST", path, json=body, timeout=timeout)

    def _request(self, method: str, path: str, *, timeout: float, **kwargs: Any) -> dict[str, Any]:
        """``timeout``: seconds for the whole request and answer, not per read."""
        what = f"{method} {path}"
        try:
            # No redirects: a VM's Location would take the request, body and all, off the
            # pinned channel (an http:// URL goes through an adapter that pins nothing).
            response = self._session.request(method, self._base + path, timeout=timeout,
                                             allow_redirects=False, **kwargs)
        except DeadlinePassed as exc:
            raise Unreachable(f"{what} over the pinned channel: the agent at {self.address} did not answer "
                              f"within {exc.seconds:g} s (the deadline for the whole answer)") from None
        except BadAnswer as exc:
            raise Unreachable(f"the agent at {self.address} answered {what} with {exc}") from None
        except requests.exceptions.RequestException as exc:
            raise owner_error(exc, self.address, f"{what} over the pinned channel") from None
        return _decode(response.status_code, response.content, what, self.address)

    def close(self) -> None:
        self._session.close()


def _decode(status: int, body: bytes, what: str, address: str) -> dict[str, Any]:
    data = _json(body)
    if status != 200:
        error = data.get("error") if isinstance(data, dict) else None
        raise Unreachable(f"the agent at {address} answered {status} to {what}"
                          + (f": {str(error)[:300]}" if error else ""))
    if not isinstance(data, dict):
        raise Unreachable(f"the agent at {address} answered {what} with something other than a JSON object")
    return data


MAX_HEAD = 16 * 1024  # the agent's status line and headers are ~150 bytes


def ask_on(sock: ssl.SSLSocket, method: str, path: str, address: str, *, timeout: float = TIMEOUT,
           clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """One bodiless request on a connection that is already the pinned channel: the bind's
    own, once its exchange completed (docs/protocol.md §4.4), so no second handshake and no
    urllib3. The same rules as PinnedClient: ``timeout`` seconds (on ``clock``) for the request
    and its whole answer, kept here between reads (this thread owns the socket, and every read
    waits at most what remains), at most MAX_HEAD bytes of head and MAX_ANSWER of body, framed
    by Content-Length, never chunked or compressed."""
    what = f"{method} {path}"
    reader = _AnswerReader(sock, clock() + timeout, clock)
    try:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: imprint\r\nAccept-Encoding: identity\r\n"
                     "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        status, body = reader.answer()
    except TimeoutError:
        raise Unreachable(f"{what} on the bind's connection: the agent at {address} did not answer "
                          f"within {timeout:g} s (the deadline for the whole answer)") from None
    except BadAnswer as exc:
        raise Unreachable(f"the agent at {address} answered {what} with {exc}") from None
    except OSError as exc:  # ssl.SSLError included
        raise owner_error(exc, address, f"{what} on the bind's connection") from None
    return _decode(status, body, what, address)


class _AnswerReader:
    def __init__(self, sock: ssl.SSLSocket, deadline: float, clock: Callable[[], float]) -> None:
        self._sock, self._deadline, self._clock = sock, deadline, clock
        self._data = bytearray()

    def _more(self) -> bool:
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            raise TimeoutError
        self._sock.settimeout(remaining)
        chunk = self._sock.recv(_READ_CHUNK)
        self._data += chunk
        return bool(chunk)

    def answer(self) -> tuple[int, bytes]:
        while (end := self._data.find(b"\r\n\r\n")) < 0:
            if len(self._data) > MAX_HEAD:
                raise BadAnswer(f"a head longer than {MAX_HEAD} bytes")
            if not self._more():
                raise BadAnswer("an answer cut short in its head")
        if end > MAX_HEAD:
            raise BadAnswer(f"a head longer than {MAX_HEAD} bytes")
        lines = bytes(self._data[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not (parts[1].isdigit() and len(parts[1]) == 3):
            raise BadAnswer(f"a malformed status line ({printable(lines[0], 60)})")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadAnswer(f"a malformed header line ({printable(line, 60)})")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers or headers.get("content-encoding", "identity").lower() != "identity":
            raise BadAnswer("a chunked or compressed body, which the agent never sends")
        length = headers.get("content-length")
        if length is None:
            raise BadAnswer("a body without Content-Length, which the agent always sends")
        if not (length.isdigit() and int(length) <= MAX_ANSWER):
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
