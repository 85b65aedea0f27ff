"""A compromised VM against the owner's pinned client: one deadline per answer, a bounded body.

The compromised VM is a real TLS 1.3 server in this process that holds the VM key a real agent
generated and the owner pinned at bind, and requires the owner's certificate, as the agent does;
it answers slowly or without end. Its slowness (a byte every PACE s) is the input under test, not
a synchronisation; each fake stops by itself after SERVER_BOUND s, and at teardown.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from imprint import tls
from imprint.owner.client import MAX_ANSWER, MAX_HEAD, TIMEOUT, PinnedClient, ask_on
from imprint.owner.errors import Unreachable
from imprint.owner.home import OwnerHome

from tests.helpers import AgentFactory, Owner
from tests.helpers.servers import LoopbackServer

PACE = 0.5  # seconds between the bytes of a trickle
DEADLINE = 2.0  # seconds: the deadline injected into PinnedClient calls
SLACK = 1.5  # seconds past a deadline within which the owner must have given up
CLI_SLACK = 4.0  # the same for a whole `imprint` process (interpreter start, imports, the database)
# The CLI's own deadline (TIMEOUT, 10 s in production) as the test injects it, through
# IMPRINT_OWNER_REQUEST_SECONDS (imprint/timeouts.py), so the test does not wait out 10 s.
CLI_DEADLINE = 3.0
SERVER_BOUND = 30.0  # every fake stops by itself after this, long after any deadline
HEADERS = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
STATUS = b'{"state": "bound"}'


@dataclass
class Seen:
    """One connection as the fake saw it."""

    accepted: float
    dropped: float | None = None  # when the fake saw the owner's side end the connection
    sent: int = 0  # bytes of the answer sent so far
    over: threading.Event = field(default_factory=threading.Event)  # the fake is done with it


@dataclass
class Pinned:
    """The real key material: the bound VM's key and certificate, the owner's certificate."""

    vm_cert: Path
    vm_key: Path
    owner_home: Path

    def server_context(self) -> ssl.SSLContext:
        return tls.agent_pinned_context(str(self.vm_cert), str(self.vm_key),
                                        tls.PinnedCert.from_pem((self.owner_home / "owner.crt").read_text()))

    def client(self, address: str) -> PinnedClient:
        pin = tls.PinnedCert.from_pem(self.vm_cert.read_text())
        return PinnedClient(OwnerHome(self.owner_home), "vm1", pin, address)

    def ask_on_a_connection(self, address: str, timeout: float) -> dict[str, Any]:
        """``GET /v1/status`` as the bind sends it on its own connection (owner.client.ask_on),
        here on a pinned mutual-TLS connection to the fake: after the handshake the two are
        the same channel."""
        pin = tls.PinnedCert.from_pem(self.vm_cert.read_text())
        context = tls.owner_pinned_context(str(self.owner_home / "owner.crt"), str(self.owner_home / "owner.key"), pin)
        host, port = address.rsplit(":", 1)
        with context.wrap_socket(socket.create_connection((host, int(port)), timeout=timeout)) as sock:
            return ask_on(sock, "GET", "/v1/status", address, timeout=timeout)


Behaviour = Callable[["CompromisedVm", socket.socket, Seen], None]


@dataclass
class CompromisedVm:
    pinned: Pinned
    behaviour: Behaviour
    stop: threading.Event = field(default_factory=threading.Event)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.context = self.pinned.server_context()
        self.end = time.monotonic() + SERVER_BOUND
        self._server = LoopbackServer(self._serve, name="compromised-vm").start()
        self.address = self._server.address
        self.errors = self._server.errors

    def close(self) -> None:
        self.stop.set()
        self._server.close()

    def _serve(self, raw: socket.socket) -> bool:
        """One connection; False (no more) once stopped or past SERVER_BOUND."""
        seen = Seen(accepted=time.monotonic())
        self.seen.append(seen)
        try:
            self.behaviour(self, raw, seen)
        except OSError:
            seen.dropped = seen.dropped or time.monotonic()
        finally:
            seen.over.set()
        return not self.stop.is_set() and time.monotonic() < self.end

    # -- what behaviours are made of
    def handshake_and_read_request(self, raw: socket.socket) -> ssl.SSLSocket:
        sock = self.context.wrap_socket(raw, server_side=True)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            assert chunk and len(head) < 65536, f"no complete request: {head!r}"
            head += chunk
        header_part, _, body = head.partition(b"\r\n\r\n")
        lengths = [int(line.split(b":", 1)[1]) for line in header_part.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")]
        while len(body) < (lengths[0] if lengths else 0):
            body += sock.recv(65536)
        return sock

    def trickle(self, sock: socket.socket, blocks: Iterable[bytes], seen: Seen, pace: float = PACE) -> None:
        """Send ``blocks``, one each ``pace`` s, until the owner's side ends the connection (noted
        in ``seen``), the blocks run out or the fake's time is up."""
        for block in blocks:
            readable, _, _ = select.select([sock], [], [], pace)  # the pace; wakes when the owner hangs up
            if readable and not sock.recv(4096):
                seen.dropped = time.monotonic()
                return
            if self.stop.is_set() or time.monotonic() > self.end:
                return
            sock.sendall(block)
            seen.sent += len(block)


def _bytes(data: bytes) -> Iterator[bytes]:
    return (data[i:i + 1] for i in range(len(data)))


# -- the behaviours of a compromised VM -----------------------------------------------------------


def answers_properly(vm: CompromisedVm, raw: socket.socket, seen: Seen) -> None:
    sock = vm.handshake_and_read_request(raw)
    sock.sendall(HEADERS + b"Content-Length: %d\r\n\r\n" % len(STATUS) + STATUS)


def trickles_the_status_line_and_headers(vm: CompromisedVm, raw: socket.socket, seen: Seen) -> None:
    sock = vm.handshake_and_read_request(raw)
    vm.trickle(sock, _bytes(HEADERS + b"X-Slow: " + b"a" * 4000 + b"\r\n\r\n" + STATUS), seen)


def trickles_the_body(vm: CompromisedVm, raw: socket.socket, seen: Seen) -> None:
    sock = vm.handshake_and_read_request(raw)
    body = b'{"state": "' + b"a" * 4000 + b'"}'
    sock.sendall(HEADERS + b"Content-Length: %d\r\n\r\n" % len(body))
    vm.trickle(sock, _bytes(body), seen)


def endless_body(block: int, pace: float, announce: int | None = None) -> Behaviour:
    """A body, ``block`` bytes each ``pace`` s, without end: without a length, or announcing
    ``announce`` bytes (and sending more, if it is given the time)."""
    def behaviour(vm: CompromisedVm, raw: socket.socket, seen: Seen) -> None:
        sock = vm.handshake_and_read_request(raw)
        length = b"" if announce is None else b"Content-Length: %d\r\n" % announce
        sock.sendall(HEADERS + length + b"Connection: close\r\n\r\n")
        vm.trickle(sock, itertools.repeat(b" " * block), seen, pace)
    return behaviour


def announces(headers: bytes) -> Behaviour:
    """``headers``, then an endless body as fast as the owner takes it."""
    def behaviour(vm: CompromisedVm, raw: socket.socket, seen: Seen) -> None:
        sock = vm.handshake_and_read_request(raw)
        sock.sendall(HEADERS + headers + b"\r\n")
        vm.trickle(sock, itertools.repeat(b"f" * 65536), seen, 0)
    return behaviour


def trickles_the_handshake(vm: CompromisedVm, raw: socket.socket, seen: Seen) -> None:
    """The genuine TLS 1.3 server flight (ServerHello to Finished) for the pinned key, a byte
    at a time: the owner is held inside the handshake, before any HTTP."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = vm.context.wrap_bio(incoming, outgoing, server_side=True)
    flight = b""
    while not flight:
        chunk = raw.recv(65536)
        assert chunk, "no ClientHello"
        incoming.write(chunk)
        with contextlib.suppress(ssl.SSLWantReadError):
            server.do_handshake()
        flight = outgoing.read()
    vm.trickle(raw, _bytes(flight), seen)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pinned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pinned]:
    """A real agent bound by the real owner CLI, then stopped: its key is what a compromised VM holds."""
    base = tmp_path_factory.mktemp("deadline")
    factory = AgentFactory(base)
    owner = Owner(base / "owner-home")
    owner.run("init")
    try:
        agent = factory.start(factory.make_root(owner.token("vm1", "shared")))
        owner.run("bind", "vm1", "--address", agent.address)
        agent.kill()
    finally:
        factory.cleanup()
    state = agent.root / "var/lib/imprint"
    yield Pinned(state / "vm.crt", state / "vm.key", owner.home)


@pytest.fixture
def compromised(pinned: Pinned) -> Iterator[Callable[[Behaviour], CompromisedVm]]:
    started: list[CompromisedVm] = []

    def start(behaviour: Behaviour) -> CompromisedVm:
        vm = CompromisedVm(pinned, behaviour)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.close()


def _timed(call: Callable[[], Any]) -> tuple[float, BaseException | None]:
    began = time.monotonic()
    try:
        call()
    except Exception as exc:  # the test asserts what it is
        return time.monotonic() - began, exc
    return time.monotonic() - began, None


def _assert_deadline(vm: CompromisedVm, elapsed: float, error: BaseException | None, seconds: float,
                     slack: float) -> None:
    assert isinstance(error, Unreachable), f"{type(error).__name__}: {error} after {elapsed:.2f} s"
    assert f"did not answer within {seconds:g} s" in str(error), str(error)
    assert f"the agent at {vm.address}" in str(error), str(error)
    assert seconds - 0.1 <= elapsed < seconds + slack, f"gave up after {elapsed:.2f} s"
    (seen,) = vm.seen
    assert seen.over.wait(SERVER_BOUND), "the fake still serves the owner's connection"
    assert seen.dropped is not None, "the owner's connection was still open when the fake stopped"
    assert seen.dropped - seen.accepted < seconds + slack, "the connection outlived the deadline"


# -- the tests ------------------------------------------------------------------------------------


def test_the_fake_is_a_working_pinned_agent(pinned: Pinned, compromised: Any) -> None:
    """The fake speaks the pinned channel well enough to be answered: what fails below fails
    for its slowness or size, not for its keys or its HTTP."""
    vm = compromised(answers_properly)
    client = pinned.client(vm.address)
    try:
        assert client.get("/v1/status", timeout=DEADLINE) == {"state": "bound"}
        assert client.get("/v1/status", timeout=DEADLINE) == {"state": "bound"}
    finally:
        client.close()
    assert len(vm.seen) == 2, "each request has a connection of its own"


@pytest.mark.parametrize("behaviour", [trickles_the_handshake, trickles_the_status_line_and_headers,
                                       trickles_the_body, endless_body(16 * 1024, PACE, announce=MAX_ANSWER)],
                         ids=["handshake", "status-line-and-headers", "body", "endless-body"])
def test_a_trickled_answer_ends_at_the_deadline(pinned: Pinned, compromised: Any, behaviour: Behaviour) -> None:
    """A byte every PACE s would hold a per-read timeout forever; the whole answer gets DEADLINE.
    (The endless body arrives slower than MAX_ANSWER per DEADLINE: the deadline ends it, not the size.)"""
    vm = compromised(behaviour)
    client = pinned.client(vm.address)
    try:
        elapsed, error = _timed(lambda: client.get("/v1/status", timeout=DEADLINE))
    finally:
        client.close()
    _assert_deadline(vm, elapsed, error, DEADLINE, SLACK)
    assert vm.seen[0].sent < MAX_ANSWER


@pytest.mark.parametrize("behaviour", [trickles_the_status_line_and_headers, trickles_the_body],
                         ids=["status-line-and-headers", "body"])
def test_a_trickled_answer_on_the_bind_connection_ends_at_the_deadline(
        pinned: Pinned, compromised: Any, behaviour: Behaviour) -> None:
    """The bind's own status request keeps the same deadline."""
    vm = compromised(behaviour)
    elapsed, error = _timed(lambda: pinned.ask_on_a_connection(vm.address, DEADLINE))
    _assert_deadline(vm, elapsed, error, DEADLINE, SLACK)
    assert vm.seen[0].sent < MAX_ANSWER


def test_the_fake_answers_the_bind_connections_request(pinned: Pinned, compromised: Any) -> None:
    vm = compromised(answers_properly)
    assert pinned.ask_on_a_connection(vm.address, DEADLINE) == {"state": "bound"}


def test_post_takes_its_timeout_as_the_deadline_of_the_whole_answer(pinned: Pinned, compromised: Any) -> None:
    """apply passes post() a longer timeout; it too bounds the whole answer, not each read."""
    vm = compromised(trickles_the_body)
    client = pinned.client(vm.address)
    try:
        elapsed, error = _timed(lambda: client.post("/v1/apply", {"backends": {}}, timeout=DEADLINE + 1))
    finally:
        client.close()
    _assert_deadline(vm, elapsed, error, DEADLINE + 1, SLACK)


FRAMINGS = [
    (endless_body(64 * 1024, 0), "a body without Content-Length, which the agent always sends"),
    (announces(b"Content-Length: 10737418240\r\n"), f"a body of 10737418240 bytes (at most {MAX_ANSWER} are read)"),
    (announces(b"Transfer-Encoding: chunked\r\n"), "a chunked or compressed body"),
    (announces(b"Content-Encoding: gzip\r\nContent-Length: 100\r\n"), "a chunked or compressed body"),
    (announces(b"Content-Length: 2\r\n"), "more bytes than its Content-Length"),
    (announces(b"X-Long: " + b"h" * MAX_HEAD + b"\r\nContent-Length: 2\r\n"), f"a head longer than {MAX_HEAD} bytes"),
]
FRAMING_IDS = ["no-length", "huge-length", "chunked", "compressed", "overlong-body", "huge-head"]


@pytest.mark.parametrize(("behaviour", "message"), FRAMINGS, ids=FRAMING_IDS)
@pytest.mark.parametrize("transport", ["pinned-client", "bind-connection"])
def test_an_answer_too_large_or_framed_otherwise_is_refused_at_once(
        pinned: Pinned, compromised: Any, behaviour: Behaviour, message: str, transport: str) -> None:
    """One reader for both: a new pinned connection (PinnedClient) and the bind's own (ask_on)."""
    vm = compromised(behaviour)
    if transport == "pinned-client":
        client = pinned.client(vm.address)
        elapsed, error = _timed(lambda: client.get("/v1/status", timeout=TIMEOUT))
    else:
        elapsed, error = _timed(lambda: pinned.ask_on_a_connection(vm.address, TIMEOUT))
    assert isinstance(error, Unreachable), f"{type(error).__name__}: {error}"
    assert f"the agent at {vm.address} answered GET /v1/status with {message}" in str(error), str(error)
    assert elapsed < SLACK, f"took {elapsed:.2f} s"


def test_a_redirect_never_takes_the_request_off_the_pinned_channel(pinned: Pinned, compromised: Any) -> None:
    """A 307 keeps the method and body; to an http:// URL it would leave the pinned adapter."""
    elsewhere = socket.create_server(("127.0.0.1", 0))
    with elsewhere:
        location = b"http://127.0.0.1:%d/collect" % elsewhere.getsockname()[1]

        def redirects(vm: CompromisedVm, raw: socket.socket, seen: Seen) -> None:
            vm.handshake_and_read_request(raw).sendall(
                b"HTTP/1.1 307 Temporary Redirect\r\nLocation: " + location + b"\r\nContent-Length: 0\r\n\r\n")

        vm = compromised(redirects)
        client = pinned.client(vm.address)
        try:
            with pytest.raises(Unreachable, match="answered 307 to POST /v1/apply"):
                client.post("/v1/apply", {"backends": {"ssh": {"secret": "x"}}}, timeout=DEADLINE)
        finally:
            client.close()
        elsewhere.setblocking(False)
        with pytest.raises(BlockingIOError):  # a connection made before the call returned would wait here
            elsewhere.accept()


def test_imprint_status_against_a_trickling_vm_exits_4_at_its_deadline(
        pinned: Pinned, compromised: Any) -> None:
    """The real CLI, with its own deadline (TIMEOUT, injected short: CLI_DEADLINE): exit 4
    naming it, no traceback, not exit 3."""
    vm = compromised(trickles_the_status_line_and_headers)
    owner = Owner(pinned.owner_home)
    began = time.monotonic()
    result = owner.run("status", "vm1", "--address", vm.address, check=None,
                       env=dict(os.environ, IMPRINT_OWNER_REQUEST_SECONDS=f"{CLI_DEADLINE:g}"))
    elapsed = time.monotonic() - began
    assert result.returncode == 4, (result.returncode, result.stdout, result.stderr)
    assert f"the agent at {vm.address} did not answer within {CLI_DEADLINE:g} s" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "man in the middle" not in result.stderr
    assert CLI_DEADLINE <= elapsed < CLI_DEADLINE + CLI_SLACK, f"imprint status took {elapsed:.2f} s"
    (seen,) = vm.seen
    assert seen.over.wait(SERVER_BOUND), "the fake still serves the owner's connection"
    assert seen.dropped is not None and seen.dropped - seen.accepted < CLI_DEADLINE + SLACK
