"""The VM dials its owner (issue 12), on loopback with real processes: agents with no inbound
port (`--listen none`) and `imprint serve`.

Synchronisation is the agents' own systemd notifications (STATUS= "connected to the owner",
"exchanging keys") and the listener's READY=1: no sleeps.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from imprint import crypto
from imprint.guest import journal
from imprint.owner import viaserve
from imprint.owner.home import OwnerHome
from imprint.tokens import Mode

from tests.helpers import AgentFactory, Owner
from tests.helpers.agents import Agent, read_log
from tests.helpers.serve import Serve
from tests.sshkit import free_port, seed_root

AGENT_ENV = {"IMPRINT_AGENT_RECONNECT_SECONDS": "0.2", "IMPRINT_AGENT_RECONNECT_CAP_SECONDS": "1"}
WAIT = 60.0


@pytest.fixture
def serve(owner: Owner, tmp_path: Path) -> Iterator[Serve]:
    listener = Serve(owner, free_port(), tmp_path / "serve.log").start()
    yield listener
    listener.kill()


def dialling_root(agents: AgentFactory, token: str | None, *addresses: str, name: str = "vm") -> Path:
    root = seed_root(agents.make_root(token, name))  # a user database for an [ssh] apply
    cmdline = root / "proc" / "cmdline"
    cmdline.write_text(cmdline.read_text().strip() + f" imprint.owner={','.join(addresses)}\n")
    return root


def start_dialling(agents: AgentFactory, root: Path) -> Agent:
    return agents.start(root, "--listen", "none", env=dict(os.environ, **AGENT_ENV))


def await_connected(owner: Owner, agent: Agent, vm: str = "web1") -> None:
    """The agent says it is connected, and the listener has it (the agent's handshake ends a
    moment before the listener's)."""
    agent.await_status("connected to the owner")
    assert vm in (viaserve.await_connected(owner.home, [vm], WAIT) or []), read_log(agent.log_path)


def bind_dialled(agents: AgentFactory, owner: Owner, serve: Serve, mode: Mode, *addresses: str) -> Agent:
    root = dialling_root(agents, owner.token("web1", mode.value), *(addresses or (serve.address,)))
    agent = start_dialling(agents, root)
    if mode is Mode.NOSECRET:
        agent.await_status("exchanging keys")  # it waits at the listener: nothing is pinned yet
        assert owner.json("list")["vms"][0]["state"] == "unbound"
        result = owner.json("bind", "web1", "--vm-token", agent.vm_token())
        assert result["state"] == "bound", result
    await_connected(owner, agent)
    return agent


@pytest.mark.parametrize("mode", list(Mode))
def test_dialling_agent_binds_status_apply_and_survives_restarts(agents: AgentFactory, owner: Owner, serve: Serve,
                                                                 mode: Mode, tmp_path: Path) -> None:
    agent = bind_dialled(agents, owner, serve, mode)
    assert agent.state()["bound"] is True
    (bound,) = journal.read(agent.root / "var/lib/imprint/journal.log")
    assert (bound.event, bound.fields["reached"]) == ("bound", "dial-out")
    bound_entry = [e for e in owner.json("audit", "web1")["audit"] if e["outcome"] == "bound"][-1]
    assert f"to {serve.address}" in bound_entry["detail"]  # the dialled address, as the transcript covers it
    status = owner.json("status", "web1")
    assert status["state"] == "bound" and "dialled in" in status["address"]
    fingerprint = status["vm_fingerprint"]
    profile = tmp_path / "p.toml"
    profile.write_text('[ssh]\nusers = [{ name = "alice" }]\n')
    applied = owner.json("apply", "web1", "--profile", str(profile))
    assert applied["results"]["ssh"]["ok"], applied
    assert "alice:" in (agent.root / "etc/passwd").read_text()

    # kill -9 the listener and start it again on the same address: the agent comes back.
    serve.kill()
    down = owner.run("status", "web1", check=4)  # nothing listens for the VM: unreachable, not "MITM"
    assert "man in the middle" not in down.stderr
    serve.start()
    await_connected(owner, agent)
    assert owner.json("status", "web1")["vm_fingerprint"] == fingerprint

    # Restart the agent with no token on any channel: the bind record says where to dial.
    agent.kill()
    (agent.root / "proc" / "cmdline").write_text("console=ttyS0 root=LABEL=root ro\n")
    again = start_dialling(agents, agent.root)
    await_connected(owner, again)
    assert owner.json("status", "web1")["vm_fingerprint"] == fingerprint


def test_vm_token_given_before_the_vm_dials(agents: AgentFactory, owner: Owner, serve: Serve) -> None:
    root = dialling_root(agents, owner.token("web1", "nosecret"), serve.address)
    # The VM token exists before the VM runs: the agent's key is made by a first start.
    first = agents.start(root, "--listen", "127.0.0.1:0")  # listens only: nothing dials yet
    vm_token = first.vm_token()
    first.kill()
    recorded = owner.json("bind", "web1", "--vm-token", vm_token)
    assert recorded["state"] == "unbound"
    agent = start_dialling(agents, root)
    await_connected(owner, agent)
    assert owner.json("status", "web1")["state"] == "bound"


class RelayingMitm:
    """A man in the middle with its own TLS key: terminates the VM's TLS, opens its own to the
    genuine listener, and relays the plaintext both ways. Counts what the VM sent it."""

    def __init__(self, tmp: Path, upstream: str) -> None:
        key = crypto.PrivateKey.generate()
        (tmp / "mitm.key").write_bytes(key.to_pem())
        (tmp / "mitm.crt").write_bytes(key.self_signed_certificate("mitm"))
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(str(tmp / "mitm.crt"), str(tmp / "mitm.key"))
        self._up = upstream.rsplit(":", 1)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.from_vm = 0
        self.connections = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._listener.accept()
                threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        with contextlib.suppress(OSError), self._ctx.wrap_socket(conn, server_side=True) as vm, \
                client.wrap_socket(socket.create_connection((self._up[0], int(self._up[1])))) as up:
            self.connections.set()

            def pump(src: ssl.SSLSocket, dst: ssl.SSLSocket, count: bool) -> None:
                with contextlib.suppress(OSError):
                    while data := src.recv(65536):
                        if count:
                            self.from_vm += len(data)
                        dst.sendall(data)
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_RDWR)

            back = threading.Thread(target=pump, args=(up, vm, False), daemon=True)
            back.start()
            pump(vm, up, True)
            back.join(WAIT)

    def close(self) -> None:
        self._listener.close()


@pytest.mark.parametrize("mode", list(Mode))
def test_active_mitm_with_its_own_tls_key_binds_nothing(agents: AgentFactory, owner: Owner, serve: Serve,
                                                        mode: Mode, tmp_path: Path) -> None:
    mitm = RelayingMitm(tmp_path, serve.address)
    try:
        # The MITM's address first: the agent meets it, is refused or refuses, then dials the genuine one.
        agent = bind_dialled(agents, owner, serve, mode, mitm.address, serve.address)
    finally:
        mitm.close()
    assert mitm.connections.is_set()
    log = agent.log()
    if mode is Mode.NOSECRET:
        assert mitm.from_vm == 0, "the VM sent bytes to a listener whose key is not the owner's"
        assert "does not hash to the owner token" in log
    else:
        assert "CHANNEL_BINDING_MISMATCH" in read_log(serve.log) or "CHANNEL_BINDING_MISMATCH" in log
    assert f"from owner {serve.address}" in log  # bound through the genuine listener only
    assert f"from owner {mitm.address}" not in log
    assert owner.json("status", "web1")["state"] == "bound"


@pytest.mark.parametrize("mode", list(Mode))
def test_rewritten_address_to_an_attackers_listener_binds_nothing(agents: AgentFactory, owner: Owner, serve: Serve,
                                                                  mode: Mode, tmp_path: Path) -> None:
    attacker = Owner.create(tmp_path / "attacker-home")
    attacker.token("web1", mode.value)  # the attacker expects a VM of that name too
    evil = Serve(attacker, free_port(), tmp_path / "evil.log").start()
    try:
        agent = bind_dialled(agents, owner, serve, mode, evil.address, serve.address)
        assert f"from owner {evil.address}" not in agent.log()
        assert [vm["state"] for vm in attacker.json("list")["vms"]] == ["unbound"]
    finally:
        evil.kill()
    assert owner.json("status", "web1")["state"] == "bound"


def test_listener_survives_hostile_peers_and_local_clients(agents: AgentFactory, owner: Owner,
                                                          tmp_path: Path) -> None:
    """A silent TLS peer is cut after the bind deadline; a stranger's client certificate is
    refused in the handshake; garbage on the local socket gets an error; and the listener
    still binds a genuine VM afterwards."""
    listener = Serve(owner, free_port(), tmp_path / "serve.log",
                     env=dict(os.environ, IMPRINT_SERVE_EXCHANGE_SECONDS="1")).start()
    try:
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        with client.wrap_socket(socket.create_connection(("127.0.0.1", listener.port))) as silent:
            silent.settimeout(WAIT)
            assert silent.recv(1) == b""  # cut: the listener's deadline, not ours
        key = crypto.PrivateKey.generate()
        (tmp_path / "s.key").write_bytes(key.to_pem())
        (tmp_path / "s.crt").write_bytes(key.self_signed_certificate("stranger"))
        client.load_cert_chain(str(tmp_path / "s.crt"), str(tmp_path / "s.key"))
        with pytest.raises((ssl.SSLError, ConnectionError)), \
                client.wrap_socket(socket.create_connection(("127.0.0.1", listener.port))) as stranger:
            stranger.settimeout(WAIT)
            stranger.recv(1)  # TLS 1.3: the refusal of a client certificate arrives after the handshake
        assert viaserve.ask(owner.home, {"op": "no-such-op"}, WAIT) == {"ok": False, "error": "unknown-op"}
        assert viaserve.ask(owner.home, {"op": "request", "vm": 3}, WAIT) == {"ok": False, "error": "bad-request"}
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(WAIT)
            raw.connect(str(OwnerHome(owner.home).serve_socket))
            raw.sendall(b"\x1b[2J not json\n")
            assert raw.recv(4096) == b""  # not JSON: closed without an answer, and the listener goes on
        assert viaserve.connected(owner.home) == []
        agent = bind_dialled(agents, owner, listener, Mode.SHARED)
        assert agent.state()["bound"] is True
        assert listener.proc is not None and listener.proc.poll() is None
    finally:
        listener.kill()


def test_pending_pin_recovered_when_its_vm_dials_again(agents: AgentFactory, owner: Owner, serve: Serve) -> None:
    """The listener died after the VM pinned it but before it confirmed its own pin (here: the
    record put back to pending): the VM dials in with its certificate, and its answer over
    mutual TLS makes the pin final."""
    agent = bind_dialled(agents, owner, serve, Mode.SHARED)
    serve.kill()
    with sqlite3.connect(owner.home / "imprint.db") as db:
        db.execute("UPDATE pins SET state = 'pending' WHERE vm = 'web1'")
    assert owner.json("list")["vms"][0]["state"] == "pending"
    serve.start()
    await_connected(owner, agent)
    assert owner.json("status", "web1")["state"] == "bound"
    assert any("recovered" in entry["detail"] for entry in owner.json("audit", "web1")["audit"])


def test_several_bound_vms_all_dial_in_again_after_a_listener_restart(agents: AgentFactory, owner: Owner,
                                                                      serve: Serve) -> None:
    """Each VM's certificate verifies against its own pin among all of them (OpenSSL looks a
    trust anchor up by subject name: one name shared by every VM once let only the first in)."""
    started = []
    for n in range(3):
        root = dialling_root(agents, owner.token(f"vm{n}", "shared"), serve.address, name=f"vm{n}")
        started.append(start_dialling(agents, root))
    assert viaserve.await_connected(owner.home, ["vm0", "vm1", "vm2"], WAIT) == ["vm0", "vm1", "vm2"]
    serve.kill()
    serve.start()
    assert viaserve.await_connected(owner.home, ["vm0", "vm1", "vm2"], WAIT) == ["vm0", "vm1", "vm2"]
    assert "same subject" not in read_log(serve.log)


def test_the_listener_holds_vms_beyond_1024_descriptors(agents: AgentFactory, owner: Owner, tmp_path: Path) -> None:
    """1,100 idle connections first, then a VM: its descriptor is above select()'s FD_SETSIZE,
    and the listener still holds and serves it (it raises its own descriptor limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2500:
        pytest.skip(f"the hard descriptor limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2500), hard))
    listener = Serve(owner, free_port(), tmp_path / "serve.log",
                     env=dict(os.environ, IMPRINT_SERVE_HANDSHAKE_SECONDS="120")).start()
    idle = []
    try:
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", listener.port), timeout=WAIT))
        agent = bind_dialled(agents, owner, listener, Mode.SHARED)
        assert owner.json("status", "web1")["state"] == "bound"
        assert agent.proc.poll() is None and listener.proc is not None and listener.proc.poll() is None
    finally:
        for sock in idle:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        listener.kill()


def test_one_listener_per_owner_home(owner: Owner, serve: Serve) -> None:
    second = owner.run("serve", "--listen", f"127.0.0.1:{free_port()}", check=1)
    assert "another `imprint serve` runs on this owner home" in second.stderr
    assert serve.proc is not None and serve.proc.poll() is None
    assert viaserve.connected(owner.home) == []  # the first one's socket still answers
