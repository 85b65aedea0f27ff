"""Durable state on both sides: atomic writes, corrupt state fails closed, the audit log is append-only."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
from imprint.fsatomic import write_atomic
from imprint.guest.distro import Distro
from imprint.guest.state import AgentState, StateError
from imprint.owner.store import Store
from imprint.tokens import Mode

from tests.helpers import AgentFactory, Owner


def test_write_atomic_keeps_old_file_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f"
    write_atomic(target, b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "injected I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="injected"):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_corrupt_agent_state_is_refused(tmp_path: Path) -> None:
    state = AgentState(Distro(tmp_path).state_dir)
    state.dir.mkdir(parents=True)
    state.record_file.write_text("{not json")
    with pytest.raises(StateError, match="state.json is corrupt"):
        state.load_record()
    state.record_file.write_text('{"bound": true}')
    with pytest.raises(StateError, match="owner.crt is missing"):
        state.load_record()


def test_agent_with_corrupt_state_exits_naming_it(agents: AgentFactory, owner: Owner) -> None:
    root = agents.make_root(owner.token("web1", "shared"))
    (root / "var/lib/imprint").mkdir(parents=True)
    (root / "var/lib/imprint/state.json").write_text("[]garbage")
    agent = agents.start(root, expect_ready=False)
    assert agent.proc.wait(timeout=30) == 1
    assert "state.json is corrupt" in agent.log()


def test_agent_with_key_that_is_not_a_key_exits(agents: AgentFactory, owner: Owner) -> None:
    root = agents.make_root(owner.token("web1", "shared"))
    (root / "var/lib/imprint").mkdir(parents=True)
    (root / "var/lib/imprint/vm.key").write_text("not a key")
    agent = agents.start(root, expect_ready=False)
    assert agent.proc.wait(timeout=30) == 1
    assert "vm.key" in agent.log()


def test_audit_log_is_append_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "imprint.db")
    store.issue_token("web1", Mode.SHARED, "00" * 8, "imprint1s-x")
    store.audit("web1", "bind", "127.0.0.1:1", "bound", "ok")
    db = sqlite3.connect(tmp_path / "imprint.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit SET outcome = 'forged'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit")
    # issue_token audits the token in its own transaction
    assert [row.outcome for row in store.audit_log("web1")] == ["issued", "bound"]


def test_new_token_supersedes_and_wipes_the_old_secret(tmp_path: Path) -> None:
    store = Store(tmp_path / "imprint.db")
    store.issue_token("web1", Mode.SHARED, "01" * 8, "imprint1s-first")
    store.issue_token("web1", Mode.SHARED, "02" * 8, "imprint1s-second")
    rows = sqlite3.connect(tmp_path / "imprint.db").execute(
        "SELECT token_id, token_text, state FROM tokens ORDER BY id").fetchall()
    assert rows == [("01" * 8, None, "superseded"), ("02" * 8, "imprint1s-second", "issued")]


def test_cli_usage_errors_exit_2(owner: Owner) -> None:
    assert "unknown VM" in owner.run("bind", "nope", "--address", "127.0.0.1:1", check=2).stderr
    assert "not bound yet" in owner.run("token", "new", "web1", "--mode", "shared") .stderr + \
        owner.run("status", "web1", check=2).stderr
    assert "VM name" in owner.run("token", "new", "../etc", "--mode", "shared", check=2).stderr
    assert "HOST:PORT" in owner.run("bind", "web1", "--address", "nohost", check=2).stderr
    uninitialised = Owner(owner.home.parent / "empty")
    assert "imprint init" in uninitialised.run("token", "new", "web1", "--mode", "shared", check=2).stderr
    err = owner.json("bind", "web1", "--address", "nohost", check=2)
    assert err["exit_code"] == 2 and "HOST:PORT" in str(err["error"])
