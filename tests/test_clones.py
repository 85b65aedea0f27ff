"""Clone and rollback detection (issue 13 item 4; docs/protocol.md §4.7), with real agents:
a bound agent's root copied and both copies run, and a state directory rolled back to an
earlier snapshot. The owner flags them, refuses them (exit 3), records it, and clears the flag
only when told."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import AgentFactory, Owner
from tests.helpers.agents import Agent


def bind(agents: AgentFactory, owner: Owner, mode: str) -> Agent:
    agent = agents.start(agents.make_root(owner.token("web1", mode)))
    args = ["bind", "web1", "--address", agent.address]
    owner.run(*args, *(["--vm-token", agent.vm_token()] if mode == "nosecret" else []))
    return agent


def counter(agent: Agent) -> int:
    return int(json.loads((agent.root / "var/lib/imprint/state.json").read_text())["session_counter"])


@pytest.mark.parametrize("mode", ["shared", "nosecret"])
def test_a_copied_vm_is_flagged_cloned_and_both_copies_are_refused(agents: AgentFactory, owner: Owner,
                                                                   mode: str, tmp_path: Path) -> None:
    original = bind(agents, owner, mode)
    owner.run("status", "web1")
    assert counter(original) == 1
    copy_root = tmp_path / "copy"
    shutil.copytree(original.root, copy_root, symlinks=True)  # a copied disk: same key, same pin, same counter
    copy = agents.start(copy_root)
    owner.run("status", "web1")  # the original talks: its counter moves on
    assert counter(original) == 2 and counter(copy) == 1

    stale = owner.run("status", "web1", "--address", copy.address, check=3)
    assert "rolled-back" in stale.stderr and "imprint resolve web1" in stale.stderr
    assert counter(copy) == 1, "a stale copy must not advance"
    again = owner.run("status", "web1", check=3)  # the original, current: two copies are alive
    assert "cloned" in again.stderr
    assert owner.json("list")["vms"][0]["state"] == "cloned"
    profile = tmp_path / "p.toml"
    profile.write_text('[motd]\ntext = "hi"\n')
    owner.run("apply", "web1", "--profile", str(profile), check=3)  # nothing is sent to a flagged VM
    assert not (original.root / "etc/motd.d/imprint").exists()
    outcomes = [(e["action"], e["outcome"]) for e in owner.json("audit", "web1")["audit"]]
    assert ("session", "rolled-back") in outcomes and ("session", "cloned") in outcomes

    # The owner decides (here: the copy is destroyed): the original is trusted again.
    copy.kill()
    assert owner.json("resolve", "web1")["cleared"] == "cloned"
    assert owner.json("status", "web1")["state"] == "bound"
    assert owner.json("list")["vms"][0]["state"] == "bound"


def test_a_state_directory_rolled_back_to_a_snapshot_is_flagged(agents: AgentFactory, owner: Owner,
                                                                 tmp_path: Path) -> None:
    agent = bind(agents, owner, "shared")
    owner.run("status", "web1")
    state = agent.root / "var/lib/imprint"
    snapshot = tmp_path / "snapshot"
    shutil.copytree(state, snapshot)
    owner.run("status", "web1")
    owner.run("status", "web1")
    agent.kill()
    shutil.rmtree(state)
    shutil.copytree(snapshot, state)  # restored from the snapshot
    restored = agents.start(agent.root, port=agent.port)
    refused = owner.run("status", "web1", check=3)
    assert "rolled-back" in refused.stderr and "snapshot" in refused.stderr
    assert owner.json("list")["vms"][0]["state"] == "rolled-back"
    owner.run("status", "web1", check=3)  # the same restored VM again: still rolled back, not "cloned"
    assert owner.json("list")["vms"][0]["state"] == "rolled-back"
    assert restored.proc.poll() is None
