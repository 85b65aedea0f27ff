"""A flood of slow, hostile clients against a real agent, and what the owner sees through it.

The clients are real loopback sockets, bounded in number and in time, that stop by themselves:

* ``garbage``: fails the TLS handshake at once (it speaks HTTP), then sends one byte a second
  into the agent's lingering close;
* ``slowhello``: sends a genuine TLS 1.3 ClientHello one byte a second, so the handshake never
  completes;
* ``rushhello``: sends part of a ClientHello and waits, and reconnects the moment the agent
  drops it: a flood as fast as the agent can accept.

Every client reconnects when the agent drops it, as an attacker would, until the flood ends.
The owner must get through within a bound far below the trickle's length, and an owner-side
failure must be reported for what it is: unreachable (exit 4), not "man in the middle" (exit 3).
Pacing the attack (a byte a second) is the only timed wait here; everything the test checks
waits on a socket, a process or an event.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from imprint import crypto, tls

from tests.helpers import Agent, AgentFactory, Owner
from tests.helpers.servers import LoopbackServer
from tests.helpers.tlsbytes import client_hello

Kind = Literal["garbage", "slowhello", "rushhello"]

TRICKLE_SECONDS = 90.0  # how long the flood would last if the test did not stop it
OWNER_BOUND = 15.0  # the owner gets through within this, far less than the trickle
# Bounds each flood in count even if the agent drops it fast.
MAX_CONNECTIONS_PER_CLIENT: dict[Kind, int] = {"garbage": 40, "slowhello": 40, "rushhello": 400}
GARBAGE = b"GET / HTTP/1.1\r\nHost: imprint\r\n\r\n"
# The agent's deadlines in the deadline test (production: 10 s and 30 s), whole seconds as its
# log names them, well above a loaded machine's handshake and past LINGER and the 1 s pace.
SHORT_DEADLINES = {"IMPRINT_AGENT_HANDSHAKE_SECONDS": 4.0, "IMPRINT_AGENT_REQUEST_SECONDS": 5.0}


@dataclass
class Connection:
    opened: float
    dropped: float | None = None  # when the client saw the agent had closed it


@dataclass
class Client:
    kind: Kind
    source: str
    connections: list[Connection] = field(default_factory=list)
    first_sent: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class Flood:
    """Slow clients against ``port``; each keeps one connection open and trickles into it."""

    def __init__(self, port: int, kinds: dict[Kind, int], *, source: str = "127.0.0.1",
                 reconnect: bool = True, seconds: float = TRICKLE_SECONDS) -> None:
        self.port = port
        self.reconnect = reconnect
        self.seconds = seconds
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.hello = client_hello()
        self.opened = 0  # connections made so far, all clients together
        self._opened_changed = threading.Condition()
        self.clients = [Client(kind, source) for kind, count in kinds.items() for _ in range(count)]

    def start(self) -> None:
        for number, client in enumerate(self.clients):
            client.thread = threading.Thread(target=self._run, args=(client,), daemon=True,
                                             name=f"flood-{client.kind}-{number}")
            client.thread.start()
        for client in self.clients:
            assert client.first_sent.wait(15), f"a {client.kind} client could not connect"
        self.await_agent_caught_up()

    def await_agent_caught_up(self) -> None:
        """One more connection after all of the flood's: once the agent answers it (an alert or a
        close), its accept loop has taken every flood connection that came before."""
        marker = socket.create_connection(("127.0.0.1", self.port), timeout=15)
        with marker:
            marker.sendall(GARBAGE)
            readable, _, _ = select.select([marker], [], [], 15)
            assert readable, "the agent did not answer a connection made after the flood's"

    def await_churn(self, connections: int, timeout: float = 30) -> None:
        """Until the flood has made ``connections`` connections: the agent dropped its first ones
        (at a deadline or for a newcomer) and the clients came back."""
        with self._opened_changed:
            assert self._opened_changed.wait_for(lambda: self.opened >= connections, timeout), (
                f"only {self.opened} flood connections in {timeout} s")

    def running(self) -> int:
        return sum(1 for c in self.clients if c.thread is not None and c.thread.is_alive())

    def close(self) -> None:
        self.stop.set()
        for client in self.clients:
            assert client.thread is not None
            client.thread.join(10)
        alive = [c.thread.name for c in self.clients if c.thread is not None and c.thread.is_alive()]
        assert not alive, f"flood clients still running: {alive}"

    # -- one client
    def _run(self, client: Client) -> None:
        end = self.started + self.seconds
        while not self.stop.is_set() and time.monotonic() < end:
            if len(client.connections) >= (MAX_CONNECTIONS_PER_CLIENT[client.kind] if self.reconnect else 1):
                return
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                                source_address=(client.source, 0))
            except OSError:
                self.stop.wait(1.0)  # the attacker's pace, not a synchronisation
                continue
            connection = Connection(opened=time.monotonic())
            client.connections.append(connection)
            with self._opened_changed:
                self.opened += 1
                self._opened_changed.notify_all()
            with sock:
                if client.kind == "rushhello":
                    self._hold(client, sock, end)
                else:
                    self._trickle(client, sock, end)
            connection.dropped = time.monotonic()

    def _hold(self, client: Client, sock: socket.socket, end: float) -> None:
        """Part of a ClientHello, then nothing, until the agent closes."""
        try:
            sock.sendall(self.hello[:40])
            client.first_sent.set()
            while not self.stop.is_set() and time.monotonic() < end:
                readable, _, _ = select.select([sock], [], [], 1.0)  # wakes to check stop
                if readable and not sock.recv(4096):
                    return
        except OSError:
            return

    def _trickle(self, client: Client, sock: socket.socket, end: float) -> None:
        """One byte a second until the agent drops the connection (a send or recv fails)."""
        payload = GARBAGE if client.kind == "garbage" else self.hello
        first = len(GARBAGE) if client.kind == "garbage" else 1
        position = 0
        peer_done = False  # the agent's FIN arrived; it may still be reading (lingering close)
        try:
            sock.sendall(payload[:first])
            position = first
            client.first_sent.set()
            next_byte = time.monotonic() + 1.0
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= end:
                    return
                if now >= next_byte:
                    sock.send(payload[position:position + 1] if position < len(payload) else b"x")
                    position += 1
                    next_byte += 1.0
                    continue
                wait = next_byte - now
                if peer_done:
                    self.stop.wait(wait)  # the attacker's pace
                    continue
                readable, _, _ = select.select([sock], [], [], wait)
                if readable and not sock.recv(4096):
                    peer_done = True
        except OSError:
            return  # dropped by the agent


@pytest.fixture
def floods() -> Iterator[list[Flood]]:
    started: list[Flood] = []
    yield started
    for flood in started:
        flood.close()


def start_flood(floods: list[Flood], agent: Agent, kinds: dict[Kind, int], **kwargs: Any) -> Flood:
    flood = Flood(agent.port, kinds, **kwargs)
    floods.append(flood)
    flood.start()
    return flood


FLOOD: dict[Kind, int] = {"garbage": 64, "slowhello": 32}  # more than the agent's 64 unauthenticated slots


def timed(owner: Owner, *args: str) -> tuple[float, int, str]:
    began = time.monotonic()
    result = owner.run(*args, check=None)
    return time.monotonic() - began, result.returncode, result.stdout + result.stderr


def assert_through(what: str, flood: Flood, agent: Agent, elapsed: float, code: int, output: str) -> None:
    assert code == 0, f"{what} exited {code} after {elapsed:.1f} s under the flood:\n{output}\n{agent.log()}"
    assert "man in the middle" not in output
    assert elapsed < OWNER_BOUND, f"{what} took {elapsed:.1f} s under the flood"
    assert flood.running() == len(flood.clients), "the flood ended before the owner got through"
    assert "evicted for a newer connection" in agent.log(), "the flood never filled the unauthenticated pool"


def test_an_unbound_agent_is_bound_through_a_flood_of_slow_clients(
    agents: AgentFactory, owner: Owner, floods: list[Flood]
) -> None:
    agent = agents.start(agents.make_root(owner.token("web1", "shared")))
    flood = start_flood(floods, agent, FLOOD)
    flood.await_churn(2 * len(flood.clients))

    elapsed, code, output = timed(owner, "bind", "web1", "--address", agent.address)

    assert_through("bind", flood, agent, elapsed, code, output)
    assert agent.state()["bound"] is True


def test_a_bound_agent_answers_status_through_a_flood_of_slow_clients(
    agents: AgentFactory, owner: Owner, floods: list[Flood]
) -> None:
    agent = agents.start(agents.make_root(owner.token("web1", "shared")))
    owner.run("bind", "web1", "--address", agent.address)
    flood = start_flood(floods, agent, FLOOD)
    flood.await_churn(2 * len(flood.clients))

    elapsed, code, output = timed(owner, "status", "web1")

    assert_through("status", flood, agent, elapsed, code, output)


def test_a_flood_that_reconnects_at_once_from_another_address_never_evicts_the_owner(
    agents: AgentFactory, owner: Owner, floods: list[Flood]
) -> None:
    """Eviction takes from the address holding the most unauthenticated connections: a flood
    from 127.0.0.2 that comes back as fast as the agent drops it only churns through itself."""
    agent = agents.start(agents.make_root(owner.token("web1", "shared")))
    flood = start_flood(floods, agent, {"rushhello": 80}, source="127.0.0.2")
    flood.await_churn(4 * len(flood.clients))

    elapsed, code, output = timed(owner, "bind", "web1", "--address", agent.address)
    assert_through("bind", flood, agent, elapsed, code, output)
    elapsed, code, output = timed(owner, "status", "web1")
    assert_through("status", flood, agent, elapsed, code, output)


# ---- deadlines: a trickle does not extend them ------------------------------------------------


def pinned_owner_socket(agent: Agent, owner: Owner) -> ssl.SSLSocket:
    """The genuine owner's mutual-TLS connection to its bound agent, made by hand."""
    vm_cert = tls.PinnedCert.from_pem((agent.root / "var/lib/imprint/vm.crt").read_text())
    context = tls.owner_pinned_context(str(owner.home / "owner.crt"), str(owner.home / "owner.key"), vm_cert)
    raw = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
    return context.wrap_socket(raw)


def trickle_request(sock: ssl.SSLSocket, seconds: float) -> float | None:
    """Send a request to the control channel a byte a second; how long until the agent closed
    (None: still open after ``seconds``)."""
    request = b"GET /v1/status HTTP/1.1\r\nHost: vm\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    opened = time.monotonic()
    with sock:
        for byte in request:
            if time.monotonic() - opened > seconds:
                return None
            try:
                sock.send(bytes([byte]))
                readable, _, _ = select.select([sock], [], [], 1.0)  # the attacker's pace
                if readable and not sock.recv(4096):
                    return time.monotonic() - opened
            except OSError:
                return time.monotonic() - opened
    return None


def test_every_connection_ends_at_its_deadline_however_slowly_it_sends(
    agents: AgentFactory, owner: Owner, floods: list[Flood]
) -> None:
    """Without a flood: a refused handshake lingers LINGER, a trickled ClientHello gets the
    handshake deadline, and the pinned owner's own trickled request gets the request deadline,
    each counted from its start, not from the last byte. The agent runs with short deadlines
    (injected through its environment: imprint/timeouts.py) so the test does not wait out 10 and 30 s."""
    from imprint.guest.server import LINGER

    agent = agents.start(agents.make_root(owner.token("web1", "shared")),
                         env=dict(os.environ, **{name: f"{value:g}" for name, value in SHORT_DEADLINES.items()}))
    handshake_deadline = SHORT_DEADLINES["IMPRINT_AGENT_HANDSHAKE_SECONDS"]
    request_deadline = SHORT_DEADLINES["IMPRINT_AGENT_REQUEST_SECONDS"]
    owner.run("bind", "web1", "--address", agent.address)
    limit = request_deadline + 15  # the clients give up here: beyond it, the agent failed
    slow_request: list[float | None] = []
    requester = threading.Thread(target=lambda: slow_request.append(
        trickle_request(pinned_owner_socket(agent, owner), limit)), daemon=True)
    requester.start()
    flood = start_flood(floods, agent, {"garbage": 1, "slowhello": 1}, reconnect=False, seconds=limit)

    requester.join(limit + 5)
    for client in flood.clients:
        assert client.thread is not None
        client.thread.join(limit + 5)
    held = {c.kind: c.connections[0] for c in flood.clients}
    lived = {kind: (c.dropped or flood.started + limit) - c.opened for kind, c in held.items()}
    # Up to two paced bytes pass before a client notices the close: hence the slack.
    assert lived["garbage"] < LINGER + 3, lived
    assert handshake_deadline - 1 < lived["slowhello"] < handshake_deadline + 3, lived
    assert slow_request and slow_request[0] is not None, "the agent kept a trickled request open"
    assert request_deadline - 1 < slow_request[0] < request_deadline + 3, slow_request
    log = agent.log()
    assert f"the TLS handshake ({handshake_deadline:.0f} s) did not finish in time" in log, log
    assert f"the next request ({request_deadline:.0f} s) did not finish in time" in log, log
    assert owner.json("status", "web1")["state"] == "bound"


def test_the_owners_idle_connections_make_room_for_its_next_request(
    agents: AgentFactory, owner: Owner, floods: list[Flood]
) -> None:
    """The owner pool holds only the pinned owner's connections; when they fill it, the oldest
    one that waits for a request makes room, and a flood of unauthenticated ones changes nothing."""
    from imprint.guest.server import MAX_OWNER

    agent = agents.start(agents.make_root(owner.token("web1", "shared")))
    owner.run("bind", "web1", "--address", agent.address)
    idle: list[ssl.SSLSocket] = []
    try:
        for _ in range(MAX_OWNER):
            sock = pinned_owner_socket(agent, owner)
            idle.append(sock)
            sock.sendall(b"GET /v1/status HTTP/1.1\r\nHost: vm\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200"), "no answer on an owner connection"
        flood = start_flood(floods, agent, {"garbage": 64, "slowhello": 16})

        elapsed, code, output = timed(owner, "status", "web1")

        assert_through("status", flood, agent, elapsed, code, output)
        assert "evicted for a newer owner connection" in agent.log()
        idle[0].settimeout(5)
        assert idle[0].recv(4096) == b"", "the oldest idle owner connection is still open"
    finally:
        for sock in idle:
            sock.close()


# ---- the owner's side: unreachable is not "man in the middle" --------------------------------


def close_at_once(conn: socket.socket) -> None:
    pass  # closed by the server on return: the owner's ClientHello is never read


def reset_after_hello(conn: socket.socket) -> None:
    conn.recv(4096)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST


def speak_http(conn: socket.socket) -> None:
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def linger(conn: socket.socket) -> None:
    """As the agent does: FIN, then read what the peer still sends, so our alert is not lost."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):
            pass


def tls_server(context: ssl.SSLContext, then: Any = None) -> Any:
    def behaviour(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False) as tls_conn:
            try:
                tls_conn.do_handshake()
            except ssl.SSLError:
                linger(tls_conn)
                return
            if then is not None:
                then(tls_conn)
    return behaviour


def read_request_then_close(conn: ssl.SSLSocket) -> None:
    conn.recv(4096)


@pytest.fixture
def bound_owner(agents: AgentFactory, owner: Owner) -> tuple[Owner, Agent]:
    """An owner with web1 bound to a real agent (which is then stopped: fakes take its place)."""
    agent = agents.start(agents.make_root(owner.token("web1", "shared")))
    owner.run("bind", "web1", "--address", agent.address)
    agent.kill()
    return owner, agent


def identity(tmp_path: Path, name: str) -> tuple[str, str]:
    key = crypto.PrivateKey.generate()
    key_file, cert_file = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    key_file.write_bytes(key.to_pem())
    cert_file.write_bytes(key.self_signed_certificate(name))
    return str(cert_file), str(key_file)


# What the owner may be told: a close with the ClientHello unread is a FIN or a reset, as the
# race between the two goes.
TRANSPORT_FAILURES: dict[str, tuple[Any, tuple[str, ...]]] = {
    "closes after accept": (close_at_once, ("the connection closed during TLS", "connection reset")),
    "resets after the ClientHello": (reset_after_hello, ("connection reset",)),
    "speaks HTTP, not TLS": (speak_http, ("does not speak TLS 1.3",)),
}


@pytest.mark.parametrize("case", sorted(TRANSPORT_FAILURES))
def test_status_against_an_agent_that_drops_the_connection_is_unreachable(
    bound_owner: tuple[Owner, Agent], case: str
) -> None:
    owner, _ = bound_owner
    behaviour, reasons = TRANSPORT_FAILURES[case]
    with LoopbackServer(behaviour, name="fake-agent") as fake:
        result = owner.run("status", "web1", "--address", fake.address, check=4)
    assert fake.connections == 1
    assert any(reason in result.stderr for reason in reasons), result.stderr
    assert "man in the middle" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", sorted(TRANSPORT_FAILURES))
def test_bind_against_an_agent_that_drops_the_connection_is_unreachable(owner: Owner, case: str) -> None:
    owner.token("web1", "shared")
    behaviour, reasons = TRANSPORT_FAILURES[case]
    with LoopbackServer(behaviour, name="fake-agent") as fake:
        result = owner.run("bind", "web1", "--address", fake.address, check=4)
    assert any(reason in result.stderr for reason in reasons), result.stderr
    assert "man in the middle" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert the_vm_state(owner) == "unbound"


def the_vm_state(owner: Owner) -> object:
    rows = owner.json("list")["vms"]
    assert isinstance(rows, list) and len(rows) == 1
    return rows[0]["state"]


def test_bind_against_a_tls_peer_that_closes_mid_exchange_is_unreachable(owner: Owner, tmp_path: Path) -> None:
    owner.token("web1", "shared")
    context = tls.agent_bind_context(*identity(tmp_path, "impostor"))
    with LoopbackServer(tls_server(context, read_request_then_close), name="fake-agent") as fake:
        result = owner.run("bind", "web1", "--address", fake.address, check=4)
    assert "closed mid-exchange" in result.stderr and "nothing was pinned by this side" in result.stderr
    assert "man in the middle" not in result.stderr, result.stderr


def test_status_against_another_key_is_authentication_failed(
    bound_owner: tuple[Owner, Agent], tmp_path: Path
) -> None:
    owner, _ = bound_owner
    context = tls.agent_bind_context(*identity(tmp_path, "another-vm"))
    with LoopbackServer(tls_server(context, read_request_then_close), name="fake-agent") as fake:
        result = owner.run("status", "web1", "--address", fake.address, check=3)
    assert "did not prove the pinned VM key" in result.stderr and "man in the middle" in result.stderr


def test_status_refused_by_the_pinned_vm_key_is_authentication_failed(
    bound_owner: tuple[Owner, Agent], tmp_path: Path
) -> None:
    """The genuine VM key, but bound to another owner: it refuses this owner's certificate."""
    owner, agent = bound_owner
    state = agent.root / "var/lib/imprint"
    other_owner_cert = tls.PinnedCert.from_pem(Path(identity(tmp_path, "other-owner")[0]).read_text())
    context = tls.agent_pinned_context(str(state / "vm.crt"), str(state / "vm.key"), other_owner_cert)
    with LoopbackServer(tls_server(context, read_request_then_close), name="fake-agent") as fake:
        result = owner.run("status", "web1", "--address", fake.address, check=3)
    assert "refused this owner's key" in result.stderr, result.stderr


def test_status_from_the_pinned_key_that_closes_without_answering_is_unreachable(
    bound_owner: tuple[Owner, Agent]
) -> None:
    owner, agent = bound_owner
    state = agent.root / "var/lib/imprint"
    context = tls.agent_bind_context(str(state / "vm.crt"), str(state / "vm.key"))
    with LoopbackServer(tls_server(context, read_request_then_close), name="fake-agent") as fake:
        result = owner.run("status", "web1", "--address", fake.address, check=4)
    assert "closed before the agent answered" in result.stderr, result.stderr
    assert "man in the middle" not in result.stderr


def test_classification_of_wrapped_errors() -> None:
    """The innermost cause decides, however the error reached the owner (raised from another,
    or carried as an argument)."""
    from imprint.owner.tlsfailures import Refused, classify

    def wrapped(inner: BaseException) -> BaseException:
        outer = OSError(f"while talking to the agent: {inner}")
        outer.__cause__ = inner
        return outer

    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    assert classify(wrapped(eof)).refused is Refused.NOTHING
    assert classify(eof).reason == "the connection closed during TLS"
    mismatch = tls.PinMismatch("the certificate shown is not the pinned certificate's bytes")
    assert classify(wrapped(mismatch)).refused is Refused.THEIRS
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    assert classify(wrapped(verify)).refused is Refused.THEIRS
    reset = OSError("Connection aborted.", ConnectionResetError(104, "Connection reset by peer"))
    assert classify(reset) == classify(ConnectionResetError(104, "x"))
    assert classify(reset).reason == "connection reset"
    assert classify(TimeoutError("The read operation timed out")).reason == "timed out"
    # A cycle in the chain ends.
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert classify(a).refused is Refused.NOTHING
