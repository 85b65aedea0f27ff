"""A VmConfirm lost in the network: the owner's retry recovers the bind, and K goes with it.

A loopback TCP proxy sits between the real `imprint` CLI and a real agent. It cannot read the
exchange (it runs inside TLS 1.3, end to end), but it reads the TLS record framing: it forwards
every record, and after the owner's OwnerProof went by it drops the agent's next application
record, the VmConfirm, and closes. Which records those are follows from the real wire format
(imprint.protocol.messages): a TLS 1.3 record carries one frame plus its content-type byte and
a 16-byte AEAD tag.
"""

from __future__ import annotations

import contextlib
import select
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from imprint import crypto, tls, tokens
from imprint.owner.store import Store
from imprint.protocol.messages import OwnerProof, VmConfirm, encode_frame

from tests.helpers import Agent, AgentFactory, Owner
from tests.helpers.servers import LoopbackServer

IO_TIMEOUT = 15.0
TLS_HEADER = 5
APPLICATION_DATA = 23
AEAD_OVERHEAD = 1 + 16  # TLS 1.3 inner content type, then the tag (AES-GCM and ChaCha20-Poly1305)
ED25519_SIGNATURE = 64


def record_length(message_type: type[OwnerProof] | type[VmConfirm], mode: str) -> int:
    """The ciphertext length of the TLS record that carries one such frame, alone."""
    mac = crypto.mac(bytes(32), b"") if mode == "shared" else b""
    return len(encode_frame(message_type(signature=bytes(ED25519_SIGNATURE), mac=mac))) + AEAD_OVERHEAD


class DropVmConfirm:
    """Forwards one connection to the agent, record by record, and drops the VmConfirm."""

    def __init__(self, agent: Agent, mode: str) -> None:
        self.agent = agent
        self.proof_length = record_length(OwnerProof, mode)
        self.confirm_length = record_length(VmConfirm, mode)
        self.dropped: list[int] = []
        self.forwarded = {"to_agent": 0, "to_owner": 0}
        self._server = LoopbackServer(self._serve, connections=1, io_timeout=IO_TIMEOUT, accept_timeout=IO_TIMEOUT,
                                      name="drop-vmconfirm")
        self.address = self._server.address
        self.errors = self._server.errors  # a proxy failure, even a socket's, fails the test

    @contextlib.contextmanager
    def running(self) -> Iterator[DropVmConfirm]:
        with self._server:
            yield self

    def _serve(self, owner_end: socket.socket) -> None:
        try:
            agent_end = socket.create_connection(("127.0.0.1", self.agent.port), timeout=IO_TIMEOUT)
            with agent_end:
                self._relay(owner_end, agent_end)
        except OSError as exc:
            self.errors.append(exc)

    def _relay(self, owner_end: socket.socket, agent_end: socket.socket) -> None:
        buffers = {owner_end: bytearray(), agent_end: bytearray()}
        proof_passed = False
        while True:
            readable, _, _ = select.select([owner_end, agent_end], [], [], IO_TIMEOUT)
            if not readable:
                raise TimeoutError("proxy idle")
            for src in readable:
                data = src.recv(65536)
                if not data:
                    return  # either side closed: so does the proxy
                buf = buffers[src]
                buf += data
                while len(buf) >= TLS_HEADER and len(buf) >= TLS_HEADER + int.from_bytes(buf[3:5], "big"):
                    length = int.from_bytes(buf[3:5], "big")
                    record = bytes(buf[:TLS_HEADER + length])
                    del buf[:TLS_HEADER + length]
                    is_data = record[0] == APPLICATION_DATA
                    if src is owner_end:
                        agent_end.sendall(record)
                        self.forwarded["to_agent"] += 1
                        proof_passed = proof_passed or (is_data and length == self.proof_length)
                    elif proof_passed and is_data:
                        self.dropped.append(length)  # the VmConfirm: never reaches the owner
                        return
                    else:
                        owner_end.sendall(record)
                        self.forwarded["to_owner"] += 1


def owner_files_bytes(owner: Owner) -> bytes:
    """Everything the owner's home holds on disk: imprint.db, its -wal, pins, keys."""
    return b"".join(p.read_bytes() for p in sorted(owner.home.rglob("*")) if p.is_file())


def secret_of(token_text: str) -> str:
    return token_text.split("-", 1)[1]


def the_vm(owner: Owner) -> dict[str, object]:
    rows = owner.json("list")["vms"]
    assert isinstance(rows, list) and len(rows) == 1, rows
    row: dict[str, object] = rows[0]
    return row


def lose_vm_confirm(agents: AgentFactory, owner: Owner, mode: str) -> tuple[Agent, str, list[str], str]:
    """Boot an agent for web1 and run a first bind through the proxy; returns the agent, the
    token text, the --vm-token arguments and the first attempt's stderr."""
    token_text = owner.token("web1", mode)
    agent = agents.start(agents.make_root(token_text))
    vm_args = ["--vm-token", agent.vm_token()] if mode == "nosecret" else []
    proxy = DropVmConfirm(agent, mode)
    with proxy.running():
        first = owner.run("bind", "web1", "--address", proxy.address, *vm_args, check=4)
    assert not proxy.errors, proxy.errors
    assert proxy.dropped == [proxy.confirm_length], proxy.dropped  # exactly the VmConfirm went missing
    # The VM did pin this owner: only its confirmation was lost.
    state = agent.state()
    assert state["bound"] is True
    assert state["owner_fingerprint"] == owner.json("init")["owner_fingerprint"]
    return agent, token_text, vm_args, first.stderr


@pytest.mark.parametrize("mode", ["shared", "nosecret"])
def test_lost_vm_confirm_is_reported_truthfully_then_recovered_and_the_token_is_spent(
    agents: AgentFactory, owner: Owner, mode: str
) -> None:
    agent, token_text, vm_args, first = lose_vm_confirm(agents, owner, mode)

    assert "nothing was pinned" not in first, first
    assert "pending pin" in first and "rerun `imprint bind web1" in first, first
    assert "man in the middle" not in first, first
    assert the_vm(owner)["state"] == "pending"
    # The token is still the owner's to use (the VM's confirmation never came) and is on disk,
    # which also shows that the byte search below can find it.
    assert the_vm(owner)["token_state"] == "issued"
    assert secret_of(token_text).encode() in owner_files_bytes(owner)

    recovered = owner.json("bind", "web1", "--address", agent.address, *vm_args)
    assert any("recovered" in line for line in recovered["proved"]), recovered  # type: ignore[union-attr]
    assert the_vm(owner)["state"] == "bound" and the_vm(owner)["token_state"] == "consumed"
    assert the_vm(owner)["address"] == agent.address  # where the pinned channel answered, not the proxy
    assert secret_of(token_text).encode() not in owner_files_bytes(owner)

    # A bound VM takes no new token: refused as usage, and nothing new lands in the record.
    again = owner.run("token", "new", "web1", "--mode", mode, check=2)
    assert "already bound" in again.stderr, again.stderr
    assert the_vm(owner)["token_state"] == "consumed"
    assert owner.json("status", "web1")["state"] == "bound"
    assert secret_of(token_text).encode() not in owner_files_bytes(owner)


def test_a_token_made_while_the_pin_is_pending_is_spent_by_the_recovery(
    agents: AgentFactory, owner: Owner
) -> None:
    """`token new` between the lost confirmation and the rerun supersedes (and wipes) K; the
    rerun still recovers through the pinned channel, and the new token dies with the bind."""
    agent, first_token, _, _ = lose_vm_confirm(agents, owner, "shared")
    second_token = owner.token("web1", "shared")
    assert secret_of(first_token).encode() not in owner_files_bytes(owner)

    recovered = owner.json("bind", "web1", "--address", agent.address)
    assert any("recovered" in line for line in recovered["proved"]), recovered  # type: ignore[union-attr]
    files = owner_files_bytes(owner)
    assert secret_of(first_token).encode() not in files and secret_of(second_token).encode() not in files
    assert the_vm(owner)["token_state"] == "consumed"


def test_confirming_a_pin_wipes_k_from_the_database_and_its_wal_at_once(tmp_path: Path) -> None:
    path = tmp_path / "imprint.db"
    store = Store(path)
    k = tokens.Token(tokens.TokenKind.SHARED, bytes(range(32)))
    store.issue_token("web1", tokens.Mode.SHARED, k.token_id.hex(), k.encode())
    store.pin_pending("web1", tls.PinnedCert(b"a certificate"), "SHA256:x", tokens.Mode.SHARED, "127.0.0.1:1")
    wal = path.with_name("imprint.db-wal")
    before = path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert secret_of(k.encode()).encode() in before

    store.confirm_pin("web1")  # the store stays open: its -wal is live

    after = path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert secret_of(k.encode()).encode() not in after
    row = store.current_token("web1")
    assert row is not None and row.state == "consumed" and row.token_text is None
    store.close()


def test_opening_an_old_home_wipes_k_of_a_vm_already_bound(tmp_path: Path) -> None:
    """What the recovery of a lost VmConfirm used to leave: the pin bound, the token issued with K."""
    path = tmp_path / "imprint.db"
    store = Store(path)
    k = tokens.Token(tokens.TokenKind.SHARED, bytes(range(1, 33)))
    store.issue_token("web1", tokens.Mode.SHARED, k.token_id.hex(), k.encode())
    store.issue_token("web2", tokens.Mode.SHARED, "00" * 8, "imprint1s-stillmine")  # unbound: keeps its token
    store.pin_pending("web1", tls.PinnedCert(b"a certificate"), "SHA256:x", tokens.Mode.SHARED, "127.0.0.1:1")
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE pins SET state = 'bound' WHERE vm = 'web1'")  # the old confirm_pin, alone
    db.commit()
    db.close()
    assert secret_of(k.encode()).encode() in path.read_bytes()

    healed = Store(path)

    wal = path.with_name("imprint.db-wal")
    assert secret_of(k.encode()).encode() not in path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    web1, web2 = healed.current_token("web1"), healed.current_token("web2")
    assert web1 is not None and web1.state == "consumed" and web1.token_text is None
    assert web2 is not None and web2.state == "issued" and web2.token_text == "imprint1s-stillmine"
    healed.close()
