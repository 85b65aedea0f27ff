"""Real `imprint-agent` processes and the real `imprint` CLI binding on loopback, both modes."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers import AgentFactory, Owner


@pytest.mark.parametrize("mode", ["shared", "nosecret"])
def test_bind_then_pinned_status(agents: AgentFactory, owner: Owner, mode: str) -> None:
    token = owner.token("web1", mode)
    agent = agents.start(agents.make_root(token))
    args = ["bind", "web1", "--address", agent.address]
    if mode == "nosecret":
        args += ["--vm-token", agent.vm_token()]
    bound = owner.json(*args)
    assert bound["mode"] == mode
    state = agent.state()
    assert state["bound"] is True
    assert state["owner_fingerprint"] == bound["owner_fingerprint"]

    status = owner.json("status", "web1")
    assert status["state"] == "bound"
    assert status["vm_fingerprint"] == bound["vm_fingerprint"]

    listing = owner.json("list")
    assert listing["vms"] == [{
        "vm": "web1", "state": "bound", "mode": mode, "token_state": "consumed",
        "address": agent.address, "vm_fingerprint": bound["vm_fingerprint"],
    }]
    audit = owner.json("audit", "web1")["audit"]
    assert [e["outcome"] for e in audit] == ["issued", "bound"]


@pytest.mark.parametrize("mode", ["shared", "nosecret"])
def test_token_is_single_use_but_owner_reconnects(agents: AgentFactory, owner: Owner, mode: str) -> None:
    token = owner.token("web1", mode)
    agent = agents.start(agents.make_root(token))
    vm_args = ["--vm-token", agent.vm_token()] if mode == "nosecret" else []
    owner.run("bind", "web1", "--address", agent.address, *vm_args)

    # A second owner record holding the same token (e.g. a copy of K) cannot bind again.
    second = _bind_as_another_owner(owner.home.parent / "other-home", token, mode, agent.address, vm_args)
    assert "already bound" in second.stderr
    # The genuine owner still talks to its VM without K.
    assert owner.json("status", "web1")["state"] == "bound"


def _bind_as_another_owner(home: Path, token: str, mode: str, address: str,
                           vm_args: list[str]) -> subprocess.CompletedProcess[str]:
    """A second owner (its own home) binds web1 at ``address`` holding the same token (in shared
    mode a copy of K; in no-secrets mode its own token): refused as authentication (exit 3)."""
    other = Owner(home)
    other.run("init")
    other.run("token", "new", "web1", "--mode", mode)
    if mode == "shared":
        _replace_token(other, "web1", token)
    return other.run("bind", "web1", "--address", address, *vm_args, check=3)


def _replace_token(owner: Owner, vm: str, token: str) -> None:
    import sqlite3

    from imprint import tokens

    parsed = tokens.parse(token)
    db = sqlite3.connect(owner.home / "imprint.db")
    db.execute("UPDATE tokens SET token_text = ?, token_id = ? WHERE vm = ? AND state = 'issued'",
               (token, parsed.token_id.hex(), vm))
    db.commit()
    db.close()


def test_state_files_are_private(agents: AgentFactory, owner: Owner) -> None:
    agent = agents.start(agents.make_root(owner.token("web1", "shared")))
    owner.run("bind", "web1", "--address", agent.address)
    state_dir = agent.root / "var/lib/imprint"
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    for name in ("vm.key", "owner.crt", "state.json"):
        assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((owner.home / "owner.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((owner.home / "imprint.db").stat().st_mode) == 0o600
    assert not [p for p in os.listdir(state_dir) if ".tmp." in p]


def test_shared_secret_never_logged(agents: AgentFactory, owner: Owner) -> None:
    token = owner.token("web1", "shared")
    agent = agents.start(agents.make_root(token), "--verbose")
    bound = owner.run("bind", "web1", "--address", agent.address)
    secret_part = token.split("-", 1)[1]
    assert secret_part not in agent.log()
    assert secret_part not in bound.stdout + bound.stderr
    assert secret_part not in (agent.root / "var/lib/imprint/state.json").read_text()
    # K is wiped from the owner's record once consumed.
    assert secret_part.encode() not in (owner.home / "imprint.db").read_bytes()


@pytest.mark.parametrize("mode", ["shared", "nosecret"])
def test_restart_after_kill_keeps_key_and_pin(agents: AgentFactory, owner: Owner, mode: str) -> None:
    token = owner.token("web1", mode)
    root = agents.make_root(token)
    agent = agents.start(root)
    vm_args = ["--vm-token", agent.vm_token()] if mode == "nosecret" else []
    bound = owner.json("bind", "web1", "--address", agent.address, *vm_args)
    key_before = (root / "var/lib/imprint/vm.key").read_bytes()
    agent.kill()

    restarted = agents.start(root, port=agent.port)
    assert "not looking for a token" in restarted.log()
    assert (root / "var/lib/imprint/vm.key").read_bytes() == key_before
    status = owner.json("status", "web1")
    assert status["vm_fingerprint"] == bound["vm_fingerprint"]
    assert status["owner_fingerprint"] == bound["owner_fingerprint"]
    # The token on the boot channel stays consumed across the restart.
    _bind_as_another_owner(owner.home.parent / "again", token, mode, restarted.address, vm_args)


def test_restart_before_bind_keeps_key(agents: AgentFactory, owner: Owner) -> None:
    root = agents.make_root(owner.token("web1", "nosecret"))
    first = agents.start(root)
    vm_token = first.vm_token()
    first.kill()
    second = agents.start(root)
    assert second.vm_token() == vm_token
    owner.run("bind", "web1", "--address", second.address, "--vm-token", vm_token)
