"""A backend is one plugin: a third-party distribution (tests/plugins/imprint-motd, pip-installed
by tools/bootstrap.sh, never imported by its path) with both halves and a schema, found through
the one entry-point group on both sides and applied to a real agent; the owner's core knows no
backend by name; per-VM backend data in one store table, migrated from ssh_targets."""

from __future__ import annotations

import ast
import json
import os
import signal
import sqlite3
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from imprint import backends, crypto
from imprint.backends.plugin import Backend
from imprint.owner.store import Store

from tests.helpers import AgentFactory, Owner

AGENT_ROOT = Path(__file__).resolve().parent.parent / "agent" / "imprint"


def test_the_plugin_is_installed_not_imported_by_path() -> None:
    found = {ep.name: ep for ep in entry_points(group=backends.GROUP)}
    assert "motd" in found, "run tools/bootstrap.sh: it installs tests/plugins/imprint-motd"
    assert found["motd"].value == "imprint_motd:BACKEND"
    backend = backends.load("motd")
    assert isinstance(backend, Backend) and backend.needs_owner_half and backend.schema is not None
    import imprint_motd  # type: ignore[import-not-found]

    assert "site-packages" in str(imprint_motd.__file__)  # the installed copy, not tests/plugins


def test_a_third_party_plugin_with_both_halves_runs_on_a_real_agent(agents: AgentFactory, owner: Owner,
                                                                     tmp_path: Path) -> None:
    agent = agents.start(agents.make_root(owner.token("web1", "shared")))
    profile = tmp_path / "profile.toml"
    # The schema, checked on the owner's side: refused before the token is spent, naming the field.
    profile.write_text("[motd]\ntext = 3\n")
    refused = owner.run("bind", "web1", "--address", agent.address, "--profile", str(profile), check=2)
    assert "profile [motd]: motd.text must be str, not int" in refused.stderr
    assert agent.state().get("bound") is not True

    profile.write_text('[motd]\ntext = "Maintenance on Sunday."\n')
    bound = owner.json("bind", "web1", "--address", agent.address, "--profile", str(profile))
    motd = bound["apply"]["results"]["motd"]  # type: ignore[index]
    assert motd["ok"] is True and motd["changed"] is True, motd
    written = agent.root / "etc/motd.d/imprint"
    # The guest half wrote the file, with what the owner half added (the VM's name).
    assert written.read_text() == "Maintenance on Sunday.\n-- web1, set by its owner through imprint\n"
    # The owner half's effect: a record in the owner's database, and its note in the report.
    store = Store(owner.home / "imprint.db")
    try:
        record = store.backend_data("web1", "motd")
    finally:
        store.close()
    assert record is not None and record["sha256"] == motd["owner_data"]["sha256"]
    assert any("recorded the message of the day of web1" in note for note in motd["owner"])

    again = owner.json("apply", "web1", "--profile", str(profile))
    assert again["results"]["motd"]["changed"] is False  # type: ignore[index]


def test_the_agent_checks_the_same_schema_on_receipt(tmp_path: Path) -> None:
    """A config the owner's check would have refused, sent anyway: the agent's side refuses it
    alike, naming the field, before the guest half runs."""
    from imprint.backends import apply_document
    from imprint.guest.distro import Distro

    results = apply_document(Distro(tmp_path), {
        "motd": {"text": "hi", "vm": "web1", "colour": "red"},
        "ssh": {"users": [{"name": "alice"}, {"name": "Bob"}]},
    })["results"]
    assert results["motd"]["summary"] == "motd: unknown key(s) colour; known: text, vm"
    assert results["ssh"]["summary"].startswith("ssh.users[1].name 'Bob' is not a user name")
    assert not (tmp_path / "etc/motd.d").exists() and not (tmp_path / "etc/ssh").exists()


def _identifiers_and_imports(path: Path) -> tuple[set[str], set[str]]:
    """The names a module's code uses (not its strings and comments) and the modules it imports."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    imports: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imports.add(node.module)
        elif isinstance(node, ast.Import):
            imports.update(alias.name for alias in node.names)
    return names, imports


def test_the_owner_core_names_no_backend() -> None:
    """cli, apply, store and home reach backends only through the plugin objects."""
    for module in ("cli.py", "apply.py", "store.py", "home.py"):
        names, imports = _identifiers_and_imports(AGENT_ROOT / "owner" / module)
        assert not {m for m in imports if m.startswith("imprint.backends.")} - {"imprint.backends.plugin"}, module
        assert not names & {"OWNER_SIDES", "ssh_ca_key", "ssh_ca_pub", "known_hosts_file", "ssh_host", "ssh_port",
                            "ssh_target", "set_ssh_target", "cmd_ssh", "x509"}, module
    names, _ = _identifiers_and_imports(AGENT_ROOT / "backends" / "__init__.py")
    assert "BUILTIN" not in names


OLD_HOME_SQL = """
    CREATE TABLE vms (name TEXT PRIMARY KEY, created_at REAL NOT NULL);
    CREATE TABLE ssh_targets (vm TEXT PRIMARY KEY REFERENCES vms(name), host TEXT NOT NULL,
                              port INTEGER NOT NULL, updated_at REAL NOT NULL);
    INSERT INTO vms VALUES ('web1', 1.0), ('web2', 1.0);
    INSERT INTO ssh_targets VALUES ('web1', 'web1.example', 2222, 5.0), ('web2', '192.0.2.7', 22, 6.0);
"""


def _old_home_db(path: Path) -> None:
    """A database as a home made before backend_data has it."""
    old = sqlite3.connect(path)
    old.executescript(OLD_HOME_SQL)
    old.commit()
    old.close()


def test_ssh_targets_of_an_existing_home_move_to_backend_data(tmp_path: Path) -> None:
    path = tmp_path / "imprint.db"
    _old_home_db(path)
    store = Store(path)
    try:
        assert store.backend_data("web1", "ssh") == {"host": "web1.example", "port": 2222}
        assert store.backend_data("web2", "ssh") == {"host": "192.0.2.7", "port": 22}
        assert store.backend_data("web1", "motd") is None
    finally:
        store.close()
    db = sqlite3.connect(path)
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        rows = db.execute("SELECT vm, backend, data, updated_at FROM backend_data ORDER BY vm").fetchall()
    finally:
        db.close()
    assert "ssh_targets" not in tables
    assert [(vm, b, json.loads(d), at) for vm, b, d, at in rows] == [
        ("web1", "ssh", {"host": "web1.example", "port": 2222}, 5.0),
        ("web2", "ssh", {"host": "192.0.2.7", "port": 22}, 6.0)]
    Store(path).close()  # opened again: nothing left to migrate, nothing lost


def test_a_kill_during_the_migration_loses_no_target(tmp_path: Path) -> None:
    """kill -9 just before the migration's COMMIT: the old table is all there, and the next open
    moves it."""
    path = tmp_path / "imprint.db"
    _old_home_db(path)
    code = "import sys; from pathlib import Path; from imprint.owner.store import Store; Store(Path(sys.argv[1]))"
    killed = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "IMPRINT_CRASHPOINT": "store.commit.before"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT count(*) FROM ssh_targets").fetchone() == (2,)
    finally:
        db.close()
    store = Store(path)
    try:
        assert store.backend_data("web1", "ssh") == {"host": "web1.example", "port": 2222}
        assert store.backend_data("web2", "ssh") == {"host": "192.0.2.7", "port": 22}
    finally:
        store.close()


def test_imprint_ssh_uses_a_migrated_target(owner: Owner) -> None:
    """An old home's `imprint ssh` target still works after the move (known_hosts as it was)."""
    owner.token("web1", "shared")
    pem = crypto.PrivateKey.generate().self_signed_certificate("web1").decode()
    db = sqlite3.connect(owner.home / "imprint.db")
    db.executescript("""
        CREATE TABLE ssh_targets (vm TEXT PRIMARY KEY REFERENCES vms(name), host TEXT NOT NULL,
                                  port INTEGER NOT NULL, updated_at REAL NOT NULL);
        INSERT INTO ssh_targets VALUES ('web1', 'web1.example', 2222, 5.0);
    """)
    db.execute("INSERT INTO pins (vm, vm_cert_pem, vm_fingerprint, state, mode, address, pinned_at) "
               "VALUES ('web1', ?, 'SHA256:x', 'bound', 'shared', '127.0.0.1:1', 1.0)", (pem,))
    db.commit()
    db.close()
    (owner.home / "known_hosts").mkdir()
    (owner.home / "known_hosts" / "web1").write_text("web1.example ssh-ed25519 AAAA\n")
    printed = owner.run("ssh", "web1", "--print", "--", "true").stdout
    assert "-p 2222" in printed and printed.rstrip().endswith("web1.example true")


@pytest.mark.parametrize("name", ["../x", "owner.key", "imprint.db", "pins", ".hidden", ""])
def test_a_backend_cannot_name_a_core_file_of_the_home(tmp_path: Path, name: str) -> None:
    from imprint.owner.home import OwnerHome

    with pytest.raises(ValueError, match="cannot name a backend's file"):
        OwnerHome(tmp_path).backend_file(name)
