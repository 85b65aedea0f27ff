"""Release and transfer (issue 13 item 3), with real agents: after `release` the VM forgets its
owner and a new token binds a new one; after `transfer` the old owner is refused at the TLS
layer and the new one, after `imprint import`, has status and apply. The VM keeps nothing of
the old owner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from imprint.guest import journal

from tests.helpers import AgentFactory, Owner
from tests.helpers.agents import Agent
from tests.helpers.owner import assert_refused_by_vm
from tests.sshkit import free_port

WAIT = 60.0


def bound_agent(agents: AgentFactory, owner: Owner) -> Agent:
    agent = agents.start(agents.make_root(owner.token("web1", "shared")), port=free_port())
    owner.run("bind", "web1", "--address", agent.address)
    return agent


def give_token(agent: Agent, token: str) -> None:
    (agent.root / "proc" / "cmdline").write_text(f"console=ttyS0 imprint.token={token}\n")


@pytest.mark.parametrize("wipe", [False, True], ids=["keep-key", "wipe"])
def test_release_then_a_new_token_binds_a_new_owner(agents: AgentFactory, owner: Owner, tmp_path: Path,
                                                    wipe: bool) -> None:
    agent = bound_agent(agents, owner)
    key_before = owner.json("status", "web1")["vm_fingerprint"]
    owner.run("release", "web1", *(["--wipe"] if wipe else []))
    assert owner.json("list")["vms"][0]["state"] == "unbound"
    assert owner.run("status", "web1", check=2).stderr.count("not bound") == 1
    assert not (agent.root / "var/lib/imprint/owner.crt").exists()
    # The agent started again and waits for a token: the old one on the channel is consumed.
    newcomer = Owner.create(tmp_path / "new-owner")
    give_token(agent, newcomer.token("web1", "shared"))
    agent.notify.wait_ready(agent.log)  # READY once the new token is found
    bound = newcomer.json("bind", "web1", "--address", agent.address)
    assert bound["owner_fingerprint"] == json.loads((agent.root / "var/lib/imprint/state.json").read_text()
                                                    )["owner_fingerprint"]
    assert (bound["vm_fingerprint"] != key_before) is wipe
    events = [e.event for e in journal.read(agent.root / "var/lib/imprint/journal.log")]
    assert events == ["bound", "released", "bound"]


def test_transfer_hands_the_vm_to_a_new_owner_in_one_step(agents: AgentFactory, owner: Owner, tmp_path: Path) -> None:
    agent = bound_agent(agents, owner)
    vm_key = owner.json("status", "web1")["vm_fingerprint"]
    newcomer = Owner.create(tmp_path / "new-owner")
    handover = tmp_path / "web1.handover"
    moved = owner.json("transfer", "web1", "--to", str(newcomer.home / "owner.crt"), "--out", str(handover))
    agent.notify.wait_ready(agent.log)  # the agent started again, trusting the new owner alone
    assert owner.run("status", "web1", check=2).returncode == 2  # the old owner's pin is gone
    assert [e["action"] for e in owner.json("audit", "web1")["audit"]][-1] == "transfer"  # its history stays

    imported = newcomer.json("import", str(handover))
    assert imported["state"] == "bound" and imported["vm_fingerprint"] == vm_key
    assert newcomer.json("status", "web1")["owner_fingerprint"] == moved["owner_fingerprint"]
    profile = tmp_path / "p.toml"
    profile.write_text('[motd]\ntext = "new owner"\n')
    assert newcomer.json("apply", "web1", "--profile", str(profile))["results"]["motd"]["ok"]

    # The VM keeps nothing of the old owner, and refuses its certificate in the TLS handshake.
    state = agent.root / "var/lib/imprint"
    old_owner_fp = json.loads(owner.run("init", "--json").stdout)["owner_fingerprint"]
    for path in state.rglob("*"):
        if path.is_file() and path.name != "vm.key":
            assert old_owner_fp.encode() not in path.read_bytes(), f"{path} names the old owner"
    assert [e.event for e in journal.read(state / "journal.log")] == ["transferred"]
    assert_refused_by_vm(owner.home, newcomer.home / "pins" / "web1.crt", agent.port)
