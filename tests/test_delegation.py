"""Delegation (issue 13 item 2), with real agents and owner homes: a `read` delegate may ask
for status and is refused apply; an `operator` may apply; a delegate cannot grant unless
`admin`; a revoked delegate is refused in the TLS handshake. The VM enforces every role."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import AgentFactory, Owner
from tests.helpers.agents import Agent
from tests.helpers.owner import assert_refused_by_vm
from tests.sshkit import free_port

WAIT = 60.0


@pytest.fixture
def agent(agents: AgentFactory, owner: Owner) -> Agent:
    started = agents.start(agents.make_root(owner.token("web1", "shared")), port=free_port())
    owner.run("bind", "web1", "--address", started.address)
    return started


def delegate(owner: Owner, tmp_path: Path, name: str, role: str) -> Owner:
    other = Owner.create(tmp_path / name)
    grant = tmp_path / f"{name}.grant"
    owner.run("grant", "web1", "--to", str(other.home / "owner.crt"), "--role", role, "--out", str(grant))
    assert other.json("import", str(grant))["state"] == "bound"
    return other


def profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"{abs(hash(text))}.toml"
    path.write_text(f'[motd]\ntext = "{text}"\n')
    return path


def test_roles_are_enforced_by_the_vm(agent: Agent, owner: Owner, tmp_path: Path) -> None:
    reader = delegate(owner, tmp_path, "reader", "read")
    assert reader.json("status", "web1")["state"] == "bound"
    refused = reader.run("apply", "web1", "--profile", str(profile(tmp_path, "from a reader")), check=2)
    assert "may not POST /v1/apply" in refused.stderr
    assert not (agent.root / "etc/motd.d/imprint").exists()

    operator = delegate(owner, tmp_path, "operator", "operator")
    applied = operator.json("apply", "web1", "--profile", str(profile(tmp_path, "from an operator")))
    assert applied["results"]["motd"]["ok"]
    assert (agent.root / "etc/motd.d/imprint").read_text().startswith("from an operator")
    third = Owner.create(tmp_path / "third")
    denied = operator.run("grant", "web1", "--to", str(third.home / "owner.crt"), "--role", "read",
                          "--out", str(tmp_path / "third.grant"), check=2)
    assert "needs admin" in denied.stderr
    admin = delegate(owner, tmp_path, "admin", "admin")
    admin.run("grant", "web1", "--to", str(third.home / "owner.crt"), "--role", "read",
              "--out", str(tmp_path / "third.grant"))
    assert third.json("import", str(tmp_path / "third.grant"))["state"] == "bound"
    assert third.json("status", "web1")["state"] == "bound"
    released = admin.run("release", "web1", check=2)  # the owner's alone
    assert "needs owner" in released.stderr
    # The owner is untouched by all of it.
    assert owner.json("status", "web1")["state"] == "bound"


def test_a_revoked_delegate_is_refused_in_the_tls_handshake(agent: Agent, owner: Owner, tmp_path: Path) -> None:
    reader = delegate(owner, tmp_path, "reader", "read")
    assert reader.json("status", "web1")["state"] == "bound"
    fingerprint = owner.json("revoke", "web1", "--from", str(reader.home / "owner.crt"))["revoked"]
    agent.notify.wait_ready(agent.log)  # the agent started again without the delegate
    assert reader.run("status", "web1", check=None).returncode != 0
    assert_refused_by_vm(reader.home, reader.home / "pins" / "web1.crt", agent.port)
    assert fingerprint.startswith("SHA256:")
    assert owner.json("status", "web1")["state"] == "bound"
