"""The bind's own connection goes on as the pinned owner's control channel, and only that one.

The owner checks a bind with `GET /v1/status` on the connection the exchange ran in, not after a
second handshake (docs/protocol.md §4.4). The agent may serve a connection as a control channel
only once that connection's peer sent the OwnerProof it pinned: a connection that failed the
exchange, lost the race to another, or sent anything before the VM confirmed, gets nothing.
These run real agent processes; the owner's side is the sans-IO session driven here with the
fixed test identities, so each step can be held or altered.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imprint import crypto, tls, tokens
from imprint.owner.client import ask_on
from imprint.owner.errors import Unreachable
from imprint.protocol import AlertCode, OwnerExchange, RemoteProtocolError
from imprint.protocol.driver import ExchangeDriver

from tests.helpers import Agent, AgentFactory
from tests.helpers.keys import NOSECRET, OWNER_CERT, OWNER_KEY, VM_KEY, K

IO_TIMEOUT = 10.0
STATUS_REQUEST = b"GET /v1/status HTTP/1.1\r\nHost: imprint\r\nContent-Length: 0\r\n\r\n"


def _token(mode: str) -> tokens.Token:
    return K if mode == "shared" else NOSECRET


class OwnerSide:
    """One bind connection from the owner's side: TLS to the agent, then the exchange, which
    the test may run whole or a flight at a time."""

    def __init__(self, agent: Agent, token: tokens.Token) -> None:
        raw = socket.create_connection(("127.0.0.1", agent.port), timeout=IO_TIMEOUT)
        self.sock = tls.owner_bind_context().wrap_socket(raw)
        seen = tls.peer_certificate(self.sock)
        self.vm_fingerprint = crypto.fingerprint(crypto.certificate_spki(seen))
        vm_token = None
        if token.mode is tokens.Mode.NOSECRET:
            vm_token = tokens.Token(tokens.TokenKind.VM, crypto.sha256(crypto.certificate_spki(seen)))
        self.session = OwnerExchange(owner_key=OWNER_KEY, owner_cert=OWNER_CERT, token=token,
                                     seen_server_cert=seen, vm_token=vm_token)
        self.driver = ExchangeDriver(self.session)

    def run(self) -> None:
        self.driver.run(self.sock, time.monotonic() + IO_TIMEOUT)

    def up_to_owner_proof(self) -> bytes:
        """OwnerHello out, VmHello and VmProof in: the OwnerProof this side would send next."""
        self.sock.sendall(self.driver.opening())
        while True:
            step = self.driver.feed(self.sock.recv(4096))
            assert step.error is None, step.error
            if step.to_send:
                return step.to_send

    def refusal(self) -> RemoteProtocolError:
        """The agent's Alert, read after the last flight sent."""
        step = self.driver.feed(self.sock.recv(4096))
        assert step.error is not None, step.events
        return step.error

    def answer_to(self, request: bytes) -> bytes:
        """Everything the agent sends after ``request`` until it closes (or IO_TIMEOUT)."""
        try:
            self.sock.sendall(request)
        except OSError:
            return b""
        received = b""
        try:
            while chunk := self.sock.recv(4096):
                received += chunk
        except (ssl.SSLError, OSError):
            pass
        return received

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sides() -> Iterator[list[OwnerSide]]:
    opened: list[OwnerSide] = []
    yield opened
    for side in opened:
        side.close()


def _open(sides: list[OwnerSide], agent: Agent, token: tokens.Token) -> OwnerSide:
    side = OwnerSide(agent, token)
    sides.append(side)
    return side


@pytest.mark.parametrize("mode", ["shared", "nosecret"])
def test_the_bind_connection_answers_status_with_the_keys_just_exchanged(
        agents: AgentFactory, sides: list[OwnerSide], mode: str) -> None:
    agent = agents.start(agents.make_root(_token(mode).encode()))
    side = _open(sides, agent, _token(mode))
    side.run()
    assert agent.state()["bound"] is True
    status = ask_on(side.sock, "GET", "/v1/status", agent.address)
    assert status["state"] == "bound"
    assert status["vm_fingerprint"] == side.vm_fingerprint
    assert status["owner_fingerprint"] == OWNER_KEY.public.fingerprint
    assert status["mode"] == mode
    # ask_on asked for Connection: close, and the agent honoured it.
    assert side.sock.recv(4096) == b""


def test_the_bind_connection_serves_more_than_one_request(agents: AgentFactory, sides: list[OwnerSide]) -> None:
    """It is the control channel, not a one-off answer: keep-alive requests follow one another."""
    agent = agents.start(agents.make_root(K.encode()))
    side = _open(sides, agent, K)
    side.run()
    for _ in range(2):
        side.sock.sendall(STATUS_REQUEST)
        head = b""
        while b"\r\n\r\n" not in head:
            head += side.sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"Connection: keep-alive" in head
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        body = head.split(b"\r\n\r\n", 1)[1]
        while len(body) < length:
            body += side.sock.recv(4096)
        assert OWNER_KEY.public.fingerprint.encode() in body


def test_a_connection_that_failed_the_exchange_gets_no_control_channel(
        agents: AgentFactory, sides: list[OwnerSide]) -> None:
    agent = agents.start(agents.make_root(K.encode()))
    wrong = tokens.Token(tokens.TokenKind.SHARED, bytes(32))
    side = _open(sides, agent, wrong)
    with pytest.raises(RemoteProtocolError) as refused:
        side.run()
    assert refused.value.code is AlertCode.WRONG_TOKEN and refused.value.from_peer
    assert b"HTTP/1.1" not in side.answer_to(STATUS_REQUEST)
    assert agent.state().get("bound") is not True


def test_the_connection_that_lost_the_race_gets_no_control_channel(
        agents: AgentFactory, sides: list[OwnerSide]) -> None:
    """Two owners with K both proved the VM's key; the first to send OwnerProof binds. The
    other's OwnerProof verifies too, but the VM is bound meanwhile: TOKEN_CONSUMED, and no
    status on that connection, although its peer holds K."""
    agent = agents.start(agents.make_root(K.encode()))
    late = _open(sides, agent, K)
    held = late.up_to_owner_proof()
    first = _open(sides, agent, K)
    first.run()
    late.sock.sendall(held)
    refusal = late.refusal()
    assert refusal.code is AlertCode.TOKEN_CONSUMED and refusal.from_peer
    assert b"HTTP/1.1" not in late.answer_to(STATUS_REQUEST)
    assert ask_on(first.sock, "GET", "/v1/status", agent.address)["owner_fingerprint"] == OWNER_KEY.public.fingerprint


def test_a_request_sent_before_the_vm_confirmed_fails_the_exchange_and_pins_nothing(
        agents: AgentFactory, sides: list[OwnerSide]) -> None:
    """The exchange's framing does not stop at OwnerProof for an owner in a hurry: bytes after
    it in the same read are a frame of the exchange, and an HTTP request is a malformed one. The
    VM refuses before it pins (the owner sends the request only after VmConfirm)."""
    agent = agents.start(agents.make_root(K.encode()))
    side = _open(sides, agent, K)
    owner_proof = side.up_to_owner_proof()
    side.sock.sendall(owner_proof + STATUS_REQUEST)  # one TLS record: one read on the agent
    refusal = side.refusal()
    assert refusal.code is AlertCode.MALFORMED and refusal.from_peer
    assert agent.state().get("bound") is not True
    assert not (agent.root / "var/lib/imprint/owner.crt").exists()
    # The token is not spent: the owner binds on a new connection.
    again = _open(sides, agent, K)
    again.run()
    assert agent.state()["bound"] is True


def test_status_on_the_bind_connection_of_a_vm_that_hangs_up_is_unreachable(
        agents: AgentFactory, sides: list[OwnerSide]) -> None:
    """The agent goes away right after VmConfirm: the owner's status request reports the VM
    unreachable (the caller keeps the pending pin and says how to recover)."""
    agent = agents.start(agents.make_root(K.encode()))
    side = _open(sides, agent, K)
    side.run()
    agent.kill()
    with pytest.raises(Unreachable) as unreachable:
        ask_on(side.sock, "GET", "/v1/status", agent.address, timeout=5.0)
    assert agent.address in str(unreachable.value)



def test_the_pinned_context_built_ahead_accepts_no_client_until_it_is_pinned(tmp_path: Path) -> None:
    """The agent builds its pinned server context before the bind (guest/server.py prepare()):
    until the pin is its trust anchor, no client certificate passes, the owner's included."""
    files = {n: tmp_path / n for n in ("vm.crt", "vm.key", "owner.crt", "owner.key")}
    files["vm.crt"].write_bytes(VM_KEY.self_signed_certificate("vm"))
    files["vm.key"].write_bytes(VM_KEY.to_pem())
    files["owner.crt"].write_bytes(OWNER_KEY.self_signed_certificate("owner"))
    files["owner.key"].write_bytes(OWNER_KEY.to_pem())
    server_context = tls.agent_unpinned_context(str(files["vm.crt"]), str(files["vm.key"]))
    client_context = tls.owner_pinned_context(str(files["owner.crt"]), str(files["owner.key"]),
                                              tls.PinnedCert.from_pem(files["vm.crt"].read_text()))

    def server_side(sock: socket.socket, outcome: list[str]) -> None:
        try:
            with server_context.wrap_socket(sock, server_side=True) as tls_sock:
                peer = crypto.certificate_spki(tls.peer_certificate(tls_sock))
                outcome.append(f"accepted {crypto.fingerprint(peer)}")
        except (ssl.SSLError, OSError) as exc:
            outcome.append(f"refused: {exc}")

    def attempt() -> str:
        ours, theirs = socket.socketpair()
        ours.settimeout(IO_TIMEOUT)
        theirs.settimeout(IO_TIMEOUT)
        outcome: list[str] = []
        thread = threading.Thread(target=server_side, args=(theirs, outcome))
        thread.start()
        with contextlib.suppress(ssl.SSLError, OSError), client_context.wrap_socket(ours) as client:
            client.recv(1)  # TLS 1.3: the server's verdict on our certificate comes after the handshake
        ours.close()
        thread.join(IO_TIMEOUT)
        assert not thread.is_alive()
        return outcome[0]

    assert attempt().startswith("refused")  # no trust anchor: the owner's certificate is refused
    tls.PinnedCert.from_pem(files["owner.crt"].read_text()).trust(server_context)
    assert attempt() == f"accepted {OWNER_KEY.public.fingerprint}"
