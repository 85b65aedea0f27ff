"""A real, active man in the middle on loopback, between the real `imprint` CLI and a real agent.

The MITM listens on its own port; the CLI is pointed at it as if the site had rewritten the
address (or the port forward). It terminates the CLI's TLS with its own Ed25519 key and opens
its own TLS connection to the agent. Two kinds:

* a relaying MITM, which copies the exchange bytes both ways: the exchange is bound to the TLS
  certificate the owner saw, so it must fail in both modes and pin nothing anywhere;
* a protocol-aware MITM, which runs its own VM side toward the owner and its own owner side
  toward the agent. It succeeds exactly where the design says it can: a leaked K (shared mode),
  or a site that swaps the tokens it carries (no-secrets mode needs the channel's integrity).
  Once it has bound both sides it stays in the path, terminating the owner's pinned mutual TLS
  with its VM-side key and opening pinned mutual TLS to the agent with its owner-side key.

Every thread the MITM starts is joined at teardown; waiting is on events, queues and socket
reads, with timeouts only as upper bounds.
"""

from __future__ import annotations

import contextlib
import json
import queue
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from imprint import crypto, tls, tokens
from imprint.protocol import (
    AlertCode,
    ExchangeComplete,
    OwnerAuthenticated,
    OwnerExchange,
    RemoteProtocolError,
    VmAuthenticated,
    VmExchange,
)
from imprint.protocol.messages import Alert, FrameBuffer, OwnerHello, WireMode, decode_body, encode_frame

from tests.helpers import Agent, AgentFactory, Owner

IO_TIMEOUT = 15.0  # upper bound on any single socket wait inside the MITM
JOIN_TIMEOUT = 10.0
S = TypeVar("S", bound=socket.socket)


# ---- identities ----------------------------------------------------------------------------


@dataclass
class Identity:
    """An Ed25519 key and its self-signed certificate, also written to files for ssl contexts."""

    key: crypto.PrivateKey
    cert_pem: bytes
    key_file: Path
    cert_file: Path

    @classmethod
    def create(cls, directory: Path, name: str) -> Identity:
        directory.mkdir(parents=True, exist_ok=True)
        key = crypto.PrivateKey.generate()
        cert_pem = key.self_signed_certificate(name)
        key_file, cert_file = directory / f"{name}.key", directory / f"{name}.crt"
        key_file.write_bytes(key.to_pem())
        cert_file.write_bytes(cert_pem)
        return cls(key, cert_pem, key_file, cert_file)

    @property
    def cert_der(self) -> bytes:
        return crypto.certificate_der(self.cert_pem)

    @property
    def fingerprint(self) -> str:
        return self.key.public.fingerprint

    @property
    def nosecret_token(self) -> tokens.Token:
        return tokens.Token(tokens.TokenKind.NOSECRET, self.key.public.digest)

    @property
    def vm_token(self) -> tokens.Token:
        return tokens.Token(tokens.TokenKind.VM, self.key.public.digest)


def agent_fingerprint(agent: Agent) -> str:
    return crypto.fingerprint(crypto.certificate_spki((agent.root / "var/lib/imprint/vm.crt").read_bytes()))


def assert_nothing_pinned(agent: Agent) -> None:
    assert agent.state().get("bound") is not True, agent.state()
    assert not (agent.root / "var/lib/imprint/owner.crt").exists()
    assert agent.proc.poll() is None, agent.log()


def the_vm(owner: Owner) -> dict[str, Any]:
    """The single VM row of `imprint list --json`."""
    rows: list[dict[str, Any]] = owner.json("list")["vms"]  # type: ignore[assignment]
    assert len(rows) == 1, rows
    return rows[0]


# ---- plumbing ------------------------------------------------------------------------------


def _half_close(sock: socket.socket) -> None:
    """FIN toward the peer without tearing down the TLS object (SSLSocket.shutdown would)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_WR)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return b""


def _recv_available(sock: ssl.SSLSocket) -> bytes | None:
    """What a readable socket has, without blocking: None when the record that arrived was TLS
    housekeeping only (the agent sends TLS 1.3 session tickets after the handshake)."""
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except ssl.SSLWantReadError:
        return None
    except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return b""
    finally:
        sock.settimeout(IO_TIMEOUT)


def relay(owner_end: ssl.SSLSocket, agent_end: ssl.SSLSocket, counts: dict[str, int]) -> None:
    """Copy bytes both ways in one thread (an SSL object is never used by two threads at once),
    passing each end-of-stream on as a half close, until both directions ended."""
    peer = {owner_end: agent_end, agent_end: owner_end}
    name = {owner_end: "to_agent", agent_end: "to_owner"}
    open_ends = {owner_end, agent_end}
    while open_ends:
        ready = [s for s in open_ends if s.pending()]
        if not ready:
            ready, _, _ = select.select(list(open_ends), [], [], IO_TIMEOUT)
            if not ready:
                raise TimeoutError("relay idle")
        for sock in ready:
            data = _recv_available(sock)
            if data is None:
                continue
            if data:
                peer[sock].sendall(data)
                counts[name[sock]] = counts.get(name[sock], 0) + len(data)
            else:
                open_ends.discard(sock)
                _half_close(peer[sock])


def read_frame(sock: ssl.SSLSocket, frames: FrameBuffer) -> bytes | None:
    """The next protocol frame body from ``sock``; None at end of stream."""
    while (body := frames.next_body()) is None:
        data = _recv(sock)
        if not data:
            return None
        frames.feed(data)
    return body


def read_http(sock: ssl.SSLSocket, buf: bytearray) -> tuple[bytes, bytes] | None:
    """One HTTP/1.1 message (head, body) with a Content-Length body; None at end of stream."""
    while b"\r\n\r\n" not in buf:
        data = _recv(sock)
        if not data:
            return None
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(buf) < end + length:
        data = _recv(sock)
        if not data:
            return None
        buf += data
    body = bytes(buf[end : end + length])
    del buf[: end + length]
    return head, body


# ---- the MITM ------------------------------------------------------------------------------


@dataclass
class Mitm:
    """A loopback listener in front of ``agent``. Subclasses say what to do with a connection."""

    agent: Agent
    workdir: Path
    owner_side: Identity | None = None  # shown to the agent as "the owner" (made here unless given)
    vm_side: Identity = field(init=False)  # shown to the owner as "the VM"
    errors: list[BaseException] = field(default_factory=list)
    relayed: dict[str, int] = field(default_factory=dict)
    accepted: int = 0

    def __post_init__(self) -> None:
        self.vm_side = Identity.create(self.workdir, "mitm-vm")
        if self.owner_side is None:
            self.owner_side = Identity.create(self.workdir, "mitm-owner")
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()
        self.connection_done: queue.Queue[int] = queue.Queue()
        self._settled = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- lifecycle
    def start(self) -> None:
        self._spawn(self._accept_loop)

    @property
    def me_as_owner(self) -> Identity:
        assert self.owner_side is not None
        return self.owner_side

    def settle(self) -> None:
        """Wait until every connection accepted so far has been handled to its end."""
        while self._settled < self.accepted:
            self.connection_done.get(timeout=IO_TIMEOUT)
            self._settled += 1

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # wakes a blocked recv/select
        for thread in list(self._threads):
            thread.join(JOIN_TIMEOUT)
        for sock in sockets:
            sock.close()
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"MITM threads still running: {alive}"

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=f"mitm-{target.__name__}")
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def track(self, sock: S) -> S:
        with self._lock:
            self._sockets.append(sock)
        return sock

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._spawn(self._serve, self.track(conn), self.accepted)

    def _serve(self, conn: socket.socket, number: int) -> None:
        try:
            conn.settimeout(IO_TIMEOUT)
            self.handle(conn)
        except Exception as exc:
            if not self._closing.is_set():
                self.errors.append(exc)
        finally:
            conn.close()
            self.connection_done.put(number)

    # -- helpers for subclasses
    def tls_to_agent_for_bind(self) -> ssl.SSLSocket:
        raw = self.track(socket.create_connection(("127.0.0.1", self.agent.port), timeout=IO_TIMEOUT))
        return self.track(tls.owner_bind_context().wrap_socket(raw))

    def tls_from_owner_for_bind(self, conn: socket.socket) -> ssl.SSLSocket:
        ctx = tls.agent_bind_context(str(self.vm_side.cert_file), str(self.vm_side.key_file))
        return self.track(ctx.wrap_socket(conn, server_side=True))

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError


class RelayingMitm(Mitm):
    """Terminates TLS on both sides with its own key and copies the exchange bytes unchanged."""

    def handle(self, conn: socket.socket) -> None:
        owner_tls = self.tls_from_owner_for_bind(conn)
        agent_tls = self.tls_to_agent_for_bind()
        with owner_tls, agent_tls:
            relay(owner_tls, agent_tls, self.relayed)


@dataclass
class ExchangingMitm(Mitm):
    """Runs its own exchanges: a VM side toward the owner, an owner side toward the agent.

    ``owner_facing_token`` is what its VmExchange holds (K, or the owner's public no-secrets
    token). ``agent_facing_token`` is what its OwnerExchange presents to the agent: K, or by
    default the no-secrets token of its own owner-side key (which only works if the agent was
    booted with it).
    After both sides completed, the two bind connections go on as control channels, later
    connections are pinned mutual TLS on both sides, and (unless ``rewrite_status`` is off) the
    status the agent reports on either is rewritten to show the keys each side expects.
    """

    owner_facing_token: tokens.Token | None = None
    agent_facing_token: tokens.Token | None = None
    rewrite_status: bool = True
    owner_cert_der: bytes | None = None
    agent_cert_der: bytes | None = None
    owner_side_failure: RemoteProtocolError | None = None
    agent_replies: list[dict[str, Any]] = field(default_factory=list)
    bound_both: threading.Event = field(default_factory=threading.Event)

    def handle(self, conn: socket.socket) -> None:
        if self.bound_both.is_set():
            self._serve_pinned(conn)
        else:
            self._fake_bind(conn)

    # -- the bind connection
    def _fake_bind(self, conn: socket.socket) -> None:
        assert self.owner_facing_token is not None
        owner_tls = self.tls_from_owner_for_bind(conn)
        with owner_tls:
            vm_session = VmExchange(vm_key=self.vm_side.key, token=self.owner_facing_token,
                                    own_cert=self.vm_side.cert_der)
            try:
                while True:
                    data = _recv(owner_tls)
                    events = vm_session.receive_data(data)
                    owner_tls.sendall(vm_session.data_to_send())
                    if any(isinstance(e, OwnerAuthenticated) for e in events):
                        break
            except RemoteProtocolError as exc:
                with contextlib.suppress(OSError):
                    owner_tls.sendall(vm_session.data_to_send())
                self.owner_side_failure = exc
                return
            # The genuine owner proved its key to the MITM; now the MITM binds the agent as itself.
            self.owner_cert_der = vm_session.peer_cert
            agent_tls = self.bind_agent(self.agent_facing_token or self.me_as_owner.nosecret_token)
            # Later connections go to the pinned relay; set before the owner can open one.
            self.bound_both.set()
            vm_session.confirm()
            owner_tls.sendall(vm_session.data_to_send())
            # Both bind connections go on as control channels (the owner checks its bind with a
            # status request on its own): relay between them as on any later connection.
            with agent_tls:
                self._relay_http(owner_tls, agent_tls)

    def bind_agent(self, token: tokens.Token) -> ssl.SSLSocket:
        """The MITM's own owner side, toward the real agent, with its own key and certificate;
        the connection, now the MITM's control channel to the agent."""
        agent_tls = self.tls_to_agent_for_bind()
        with contextlib.ExitStack() as on_failure:
            on_failure.enter_context(agent_tls)
            seen = tls.peer_certificate(agent_tls)
            vm_token = None
            if token.mode is tokens.Mode.NOSECRET:
                # The site (the MITM) reads the agent's VM token; here it is the hash of the key seen.
                vm_token = tokens.Token(tokens.TokenKind.VM, crypto.sha256(crypto.certificate_spki(seen)))
            session = OwnerExchange(owner_key=self.me_as_owner.key, owner_cert=self.me_as_owner.cert_der,
                                    token=token, seen_server_cert=seen, vm_token=vm_token)
            agent_tls.sendall(session.initiate())
            while True:
                events = session.receive_data(_recv(agent_tls))
                agent_tls.sendall(session.data_to_send())
                if any(isinstance(e, ExchangeComplete) for e in events):
                    break
                assert all(isinstance(e, VmAuthenticated) for e in events)
            self.agent_cert_der = seen
            on_failure.pop_all()
        return agent_tls

    # -- later connections: pinned mutual TLS on both sides, HTTP relayed (and rewritten)
    def _serve_pinned(self, conn: socket.socket) -> None:
        assert self.owner_cert_der is not None and self.agent_cert_der is not None
        server_ctx = tls.agent_pinned_context(str(self.vm_side.cert_file), str(self.vm_side.key_file),
                                              tls.PinnedCert(self.owner_cert_der))
        owner_tls = self.track(server_ctx.wrap_socket(conn, server_side=True))  # requires the owner's cert
        raw = self.track(socket.create_connection(("127.0.0.1", self.agent.port), timeout=IO_TIMEOUT))
        client_ctx = tls.owner_pinned_context(str(self.me_as_owner.cert_file), str(self.me_as_owner.key_file),
                                              tls.PinnedCert(self.agent_cert_der))
        agent_tls = self.track(client_ctx.wrap_socket(raw))
        seen_spki = crypto.certificate_spki(tls.peer_certificate(agent_tls))
        assert seen_spki == crypto.certificate_spki(self.agent_cert_der), "not the agent the MITM bound"
        with owner_tls, agent_tls:
            self._relay_http(owner_tls, agent_tls)

    def _relay_http(self, owner_tls: ssl.SSLSocket, agent_tls: ssl.SSLSocket) -> None:
        assert self.owner_cert_der is not None
        genuine_owner_fp = crypto.fingerprint(crypto.self_signed_certificate_spki(self.owner_cert_der))
        from_owner, from_agent = bytearray(), bytearray()
        while (request := read_http(owner_tls, from_owner)) is not None:
            agent_tls.sendall(request[0] + request[1])
            response = read_http(agent_tls, from_agent)
            assert response is not None, "the agent closed the pinned channel"
            head, body = response
            if self.rewrite_status and head.startswith(b"HTTP/1.1 200"):
                status = json.loads(body)
                self.agent_replies.append(dict(status))
                status["vm_fingerprint"] = self.vm_side.fingerprint
                status["owner_fingerprint"] = genuine_owner_fp
                body = json.dumps(status, sort_keys=True).encode()
                lines = [line for line in head.split(b"\r\n")
                         if line and not line.lower().startswith(b"content-length:")]
                head = b"\r\n".join([*lines, b"Content-Length: %d" % len(body)]) + b"\r\n\r\n"
            owner_tls.sendall(head + body)


@pytest.fixture
def mitms() -> Iterator[list[Mitm]]:
    started: list[Mitm] = []
    yield started
    for mitm in started:
        mitm.close()


M = TypeVar("M", bound=Mitm)


def _start(mitms: list[Mitm], mitm: M) -> M:
    mitms.append(mitm)
    mitm.start()
    return mitm


def forged_owner_hello(agent: Agent, token_id: bytes, owner: Identity) -> Alert:
    """An OwnerHello naming the genuine no-secrets token but carrying another owner's certificate:
    the best a MITM can do toward a no-secrets agent. Returns the agent's answer."""
    raw = socket.create_connection(("127.0.0.1", agent.port), timeout=IO_TIMEOUT)
    with tls.owner_bind_context().wrap_socket(raw) as sock:
        seen = tls.peer_certificate(sock)
        sock.sendall(encode_frame(OwnerHello(mode=WireMode.NOSECRET, token_id=token_id,
                                             owner_nonce=bytes(32), owner_cert=owner.cert_der,
                                             seen_server_cert_sha256=crypto.sha256(seen))))
        body = read_frame(sock, FrameBuffer())
        while _recv(sock):  # the agent logs the refusal before it closes
            pass
    assert body is not None, "the agent closed without an alert"
    alert = decode_body(body)
    assert isinstance(alert, Alert)
    return alert


# ---- (a), (b): a relaying MITM fails in both modes and pins nothing --------------------------


def test_relaying_mitm_is_refused_in_shared_mode_and_pins_nothing(
    agents: AgentFactory, owner: Owner, mitms: list[Mitm], tmp_path: Path
) -> None:
    agent = agents.start(agents.make_root(owner.token("web1", "shared")))
    mitm = _start(mitms, RelayingMitm(agent, tmp_path / "mitm"))

    result = owner.run("bind", "web1", "--address", mitm.address, check=3)
    assert "CHANNEL_BINDING_MISMATCH" in result.stderr, result.stderr
    assert "nothing was pinned" in result.stderr
    mitm.settle()
    assert not mitm.errors, mitm.errors
    # The relay really carried the exchange both ways: the OwnerHello in, the agent's Alert out.
    assert mitm.relayed.get("to_agent", 0) > 0 and mitm.relayed.get("to_owner", 0) > 0, mitm.relayed
    assert "CHANNEL_BINDING_MISMATCH" in agent.log()
    assert_nothing_pinned(agent)
    assert the_vm(owner)["state"] == "unbound"

    bound = owner.json("bind", "web1", "--address", agent.address)
    assert bound["vm_fingerprint"] == agent_fingerprint(agent)
    assert agent.state()["owner_fingerprint"] == bound["owner_fingerprint"]


def test_relaying_mitm_is_refused_in_nosecret_mode_and_pins_nothing(
    agents: AgentFactory, owner: Owner, mitms: list[Mitm], tmp_path: Path
) -> None:
    agent = agents.start(agents.make_root(owner.token("web1", "nosecret")))
    mitm = _start(mitms, RelayingMitm(agent, tmp_path / "mitm"))

    result = owner.run("bind", "web1", "--address", mitm.address, "--vm-token", agent.vm_token(), check=3)
    assert "does not match the VM token" in result.stderr, result.stderr
    assert mitm.vm_side.fingerprint in result.stderr
    mitm.settle()
    assert not mitm.errors, mitm.errors
    assert_nothing_pinned(agent)
    assert the_vm(owner)["state"] == "unbound"

    bound = owner.json("bind", "web1", "--address", agent.address, "--vm-token", agent.vm_token())
    assert bound["vm_fingerprint"] == agent_fingerprint(agent)


# ---- (c): the documented limit of shared mode ------------------------------------------------


def test_leaked_shared_token_lets_a_protocol_aware_mitm_bind_both_sides_documented_limit(
    agents: AgentFactory, owner: Owner, mitms: list[Mitm], tmp_path: Path
) -> None:
    """Shared mode authenticates with K. Whoever knows K can be the VM to the owner and the
    owner to the VM: the exchange succeeds, each side pins the MITM. This is the documented
    limit of shared mode (K must reach the VM confidentially), shown here end to end."""
    leaked = owner.token("web1", "shared")
    agent = agents.start(agents.make_root(leaked))
    k = tokens.parse(leaked)
    mitm = _start(mitms, ExchangingMitm(agent, tmp_path / "mitm", owner_facing_token=k, agent_facing_token=k))

    bound = owner.json("bind", "web1", "--address", mitm.address)  # exits 0

    assert bound["vm_fingerprint"] == mitm.vm_side.fingerprint != agent_fingerprint(agent)
    assert the_vm(owner)["vm_fingerprint"] == mitm.vm_side.fingerprint
    state = agent.state()
    assert state["bound"] is True
    assert state["owner_fingerprint"] == mitm.me_as_owner.fingerprint != bound["owner_fingerprint"]
    pinned_owner = (agent.root / "var/lib/imprint/owner.crt").read_bytes()
    assert crypto.certificate_spki(pinned_owner) == mitm.me_as_owner.key.public.spki
    # The MITM holds the agent's pinned channel: the agent itself says who its owner is.
    assert mitm.agent_replies and mitm.agent_replies[0]["owner_fingerprint"] == mitm.me_as_owner.fingerprint
    assert mitm.agent_replies[0]["vm_fingerprint"] == agent_fingerprint(agent)
    # The MITM learnt the owner's certificate from the exchange and used it as its mTLS anchor.
    assert mitm.owner_cert_der == crypto.certificate_der((owner.home / "owner.crt").read_bytes())
    # And it stays in the path for later pinned calls.
    assert owner.json("status", "web1")["vm_fingerprint"] == mitm.vm_side.fingerprint
    mitm.settle()
    assert not mitm.errors, mitm.errors


def test_leaked_shared_token_mitm_relaying_status_verbatim_is_caught_by_the_status_cross_check(
    agents: AgentFactory, owner: Owner, mitms: list[Mitm], tmp_path: Path
) -> None:
    """The same K-holding MITM, but relaying the agent's status unchanged: the CLI compares the
    fingerprints the agent reports with the keys just exchanged and refuses (exit 3). This only
    catches a lazy MITM; the test above shows one that rewrites the status passes."""
    leaked = owner.token("web1", "shared")
    agent = agents.start(agents.make_root(leaked))
    k = tokens.parse(leaked)
    mitm = _start(mitms, ExchangingMitm(agent, tmp_path / "mitm", owner_facing_token=k, agent_facing_token=k,
                                        rewrite_status=False))

    result = owner.run("bind", "web1", "--address", mitm.address, check=3)
    assert "not the keys just exchanged" in result.stderr, result.stderr
    assert agent_fingerprint(agent) in result.stderr
    # The agent was bound (the MITM's side completed before the owner looked at the status) ...
    assert agent.state()["owner_fingerprint"] == mitm.me_as_owner.fingerprint
    # ... and the owner's audit log records the refusal.
    audit: list[dict[str, Any]] = owner.json("audit", "web1")["audit"]  # type: ignore[assignment]
    assert audit[-1]["outcome"] == "AuthenticationFailed"
    mitm.settle()
    assert not mitm.errors, mitm.errors


# ---- (d), (e): no-secrets mode ------------------------------------------------------------------


def test_nosecret_protocol_aware_mitm_fails_and_pins_nothing(
    agents: AgentFactory, owner: Owner, mitms: list[Mitm], tmp_path: Path
) -> None:
    """The owner token is the hash of the genuine owner key and the VM token the hash of the
    genuine VM key; both are public, but the MITM holds neither private key. Toward the owner it
    can only show its own TLS key (which does not hash to the VM token); toward the agent it can
    only offer its own owner key (which does not hash to the owner token)."""
    owner_token_text = owner.token("web1", "nosecret")
    agent = agents.start(agents.make_root(owner_token_text))
    genuine = tokens.parse(owner_token_text)
    mitm = _start(mitms, ExchangingMitm(agent, tmp_path / "mitm", owner_facing_token=genuine))

    result = owner.run("bind", "web1", "--address", mitm.address, "--vm-token", agent.vm_token(), check=3)
    assert "does not match the VM token" in result.stderr, result.stderr
    mitm.settle()
    assert not mitm.errors, mitm.errors
    # The owner hung up before sending a single exchange message to the MITM.
    assert mitm.owner_side_failure is not None and mitm.owner_side_failure.code is AlertCode.CLOSED
    assert mitm.owner_cert_der is None

    # Toward the agent: its own no-secrets token names another key (WRONG_TOKEN) ...
    with pytest.raises(RemoteProtocolError) as refused:
        mitm.bind_agent(mitm.me_as_owner.nosecret_token)
    assert refused.value.code is AlertCode.WRONG_TOKEN and refused.value.from_peer
    # ... and naming the genuine token with its own certificate is a KEY_MISMATCH.
    alert = forged_owner_hello(agent, genuine.token_id, mitm.me_as_owner)
    assert alert.code == AlertCode.KEY_MISMATCH, alert
    assert "does not hash to the owner token" in agent.log()
    assert_nothing_pinned(agent)
    assert the_vm(owner)["state"] == "unbound"

    owner.run("bind", "web1", "--address", agent.address, "--vm-token", agent.vm_token())


def test_nosecret_mitm_succeeds_when_the_site_swaps_both_tokens_documented_limit(
    agents: AgentFactory, owner: Owner, mitms: list[Mitm], tmp_path: Path
) -> None:
    """No-secrets mode needs the channel's integrity: a site that puts the MITM's owner token on
    the VM's command line and hands the owner the MITM's VM token (instead of the agent's) sits in
    the middle undetected, as documented."""
    genuine_text = owner.token("web1", "nosecret")
    mitm_dir = tmp_path / "mitm"
    # The site prepares the MITM's identities first, so it can boot the VM with its own token.
    owner_side = Identity.create(mitm_dir / "pre", "mitm-owner")
    agent = agents.start(agents.make_root(owner_side.nosecret_token.encode()))
    mitm = ExchangingMitm(agent, mitm_dir, owner_side=owner_side, owner_facing_token=tokens.parse(genuine_text))
    _start(mitms, mitm)

    swapped_vm_token = mitm.vm_side.vm_token.encode()
    assert swapped_vm_token != agent.vm_token()
    bound = owner.json("bind", "web1", "--address", mitm.address, "--vm-token", swapped_vm_token)

    assert bound["mode"] == "nosecret"
    assert bound["vm_fingerprint"] == mitm.vm_side.fingerprint != agent_fingerprint(agent)
    state = agent.state()
    assert state["bound"] is True and state["mode"] == "nosecret"
    assert state["owner_fingerprint"] == owner_side.fingerprint != bound["owner_fingerprint"]
    assert mitm.agent_replies[0]["owner_fingerprint"] == owner_side.fingerprint
    mitm.settle()
    assert not mitm.errors, mitm.errors
