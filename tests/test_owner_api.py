"""The owner API (imprint.owner.Owner) against real agent processes: every method, every
exception class (one per exit code of the CLI), the same home as the CLI, and the controller
example of docs/ run as a program."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from imprint import crypto, tokens
from imprint.owner import (
    AuthenticationFailed,
    BackendFailed,
    Binding,
    FleetRequest,
    FleetResult,
    Owner,
    OwnerError,
    Unreachable,
    UsageError,
    VmStatus,
)
from imprint.owner.errors import ApplyFailed

from tests.helpers import AgentFactory
from tests.helpers import Owner as OwnerCli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def api(tmp_path: Path) -> Owner:
    owner = Owner(tmp_path / "home")
    assert owner.init().created
    return owner


def agent_key(agents: AgentFactory, root: Path) -> str:
    return crypto.fingerprint(crypto.certificate_spki((root / "var/lib/imprint/vm.crt").read_bytes()))


def test_exception_classes_are_the_cli_exit_codes() -> None:
    assert [UsageError.exit_code, AuthenticationFailed.exit_code, Unreachable.exit_code, BackendFailed.exit_code,
            OwnerError.exit_code] == [2, 3, 4, 5, 1]
    assert BackendFailed is ApplyFailed
    assert all(issubclass(c, OwnerError) for c in (UsageError, AuthenticationFailed, Unreachable, BackendFailed))


@pytest.mark.parametrize("mode", ["shared", "nosecret"])
def test_init_token_bind_status_vms_audit(agents: AgentFactory, api: Owner, tmp_path: Path, mode: str) -> None:
    again = api.init()
    assert not again.created and again.home == tmp_path / "home"
    token = api.new_token("web1", mode)
    assert tokens.parse(token).mode is tokens.Mode(mode)
    root = agents.make_root(token)
    agent = agents.start(root)
    binding = api.bind("web1", agent.address, agent.vm_token() if mode == "nosecret" else None)
    assert isinstance(binding, Binding) and binding.mode is tokens.Mode(mode)
    assert binding.vm_fingerprint == agent_key(agents, root)
    assert binding.owner_fingerprint == again.owner_fingerprint == agent.state()["owner_fingerprint"]
    assert binding.status["state"] == "bound" and binding.proved
    with pytest.raises(dataclasses.FrozenInstanceError):
        binding.vm = "other"  # type: ignore[misc]

    status = api.status("web1")
    assert isinstance(status, VmStatus) and status.state == "bound" and status.vm_fingerprint == binding.vm_fingerprint
    (record,) = api.vms()
    assert (record.vm, record.state, record.mode, record.token_state, record.address) == \
        ("web1", "bound", tokens.Mode(mode), "consumed", agent.address)
    assert [(e.action, e.outcome) for e in api.audit("web1")] == [("token", "issued"), ("bind", "bound")]
    assert [e.vm for e in api.audit()] == ["web1", "web1"]

    # The CLI works on the same home and sees the same record.
    cli = OwnerCli(api.home.dir)
    assert cli.json("status", "web1")["vm_fingerprint"] == binding.vm_fingerprint
    with pytest.raises(UsageError, match="already bound"):
        api.bind("web1", agent.address)


def test_apply_a_mapping_and_a_file(agents: AgentFactory, api: Owner, tmp_path: Path) -> None:
    agent = agents.start(agents.make_root(api.new_token("web1", "shared")))
    api.bind("web1", agent.address)
    report = api.apply("web1", {"motd": {"text": "from a program"}})
    assert report.ok and report.results["motd"].changed
    assert (agent.root / "etc/motd.d/imprint").read_text().startswith("from a program\n")
    profile = tmp_path / "p.toml"
    profile.write_text('[motd]\ntext = "from a file"\n')
    assert api.apply("web1", profile).results["motd"].changed
    # Checked before anything is sent, naming the field; a program's non-JSON value is refused.
    with pytest.raises(UsageError, match=r"motd\.text must be str, not int"):
        api.apply("web1", {"motd": {"text": 3}})
    with pytest.raises(UsageError, match="JSON cannot carry"):
        api.apply("web1", {"motd": {"text": {1, 2}}})
    with pytest.raises(UsageError, match="mapping of backend names"):
        api.apply("web1", ["motd"])  # type: ignore[arg-type]


def test_bind_with_a_profile_and_a_backend_failing_in_the_vm(agents: AgentFactory, api: Owner) -> None:
    agent = agents.start(agents.make_root(api.new_token("web1", "shared")))
    # A table naming no backend installed here goes to the agent, which has none of that name.
    with pytest.raises(BackendFailed) as caught:
        api.bind("web1", agent.address, profile={"motd": {"text": "hi"}, "nosuchbackend": {}})
    error = caught.value
    assert isinstance(error.binding, Binding) and error.binding.vm == "web1"  # bound all the same
    report = error.report
    assert report is not None and not report.ok  # type: ignore[attr-defined]
    assert report.results["motd"].ok and not report.results["nosuchbackend"].ok  # type: ignore[attr-defined]
    assert api.vms()[0].state == "bound"


def test_usage_errors(api: Owner) -> None:
    with pytest.raises(UsageError, match="unknown VM 'nosuch'"):
        api.bind("nosuch", "127.0.0.1:1")
    with pytest.raises(UsageError, match="VM name"):
        api.new_token("../etc", "shared")
    with pytest.raises(UsageError, match="expected one of shared, nosecret"):
        api.new_token("web1", "plaintext")
    with pytest.raises(UsageError, match="not bound yet"):
        api.new_token("web1", "shared") and api.status("web1")
    with pytest.raises(UsageError, match="HOST:PORT"):
        api.bind("web1", "nohost")
    with pytest.raises(UsageError, match="no-secrets mode: pass the VM token"):
        api.new_token("web2", "nosecret") and api.bind("web2", "127.0.0.1:1")
    with pytest.raises(UsageError, match="run `imprint init` first"):
        Owner(api.home.dir.parent / "empty").new_token("web1", "shared")


def test_unreachable_and_authentication_failed(agents: AgentFactory, api: Owner, tmp_path: Path) -> None:
    api.new_token("web1", "shared")
    with socket_closed() as port:
        with pytest.raises(Unreachable, match="refused"):
            api.bind("web1", f"127.0.0.1:{port}")
    stranger = Owner(tmp_path / "stranger")
    stranger.init()
    api.new_token("web2", "nosecret")
    agent = agents.start(agents.make_root(stranger.new_token("web2", "nosecret")))
    with pytest.raises(AuthenticationFailed):  # the agent was booted for another owner
        api.bind("web2", agent.address, agent.vm_token())
    assert {r.vm: r.state for r in api.vms()} == {"web1": "unbound", "web2": "unbound"}
    assert [e.outcome for e in api.audit("web2")][-1] == "AuthenticationFailed"


def test_a_database_that_is_not_one_is_an_owner_error(api: Owner, tmp_path: Path) -> None:
    broken = Owner(tmp_path / "broken")
    broken.init()
    (tmp_path / "broken" / "imprint.db").write_bytes(b"not sqlite" * 100)
    with pytest.raises(OwnerError, match="cannot be used") as caught:
        broken.vms()
    assert type(caught.value) is OwnerError


def test_bind_many_from_threads_with_progress(agents: AgentFactory, api: Owner) -> None:
    names = [f"vm{i}" for i in range(12)]
    issued = {n: api.new_token(n, "shared") for n in names}
    started = {n: agents.start(agents.make_root(issued[n], n), expect_ready=False) for n in names}
    for agent in started.values():
        agent.port = agents.await_ready(agent)
    seen: list[FleetResult] = []
    threads: set[str] = set()

    def progress(result: FleetResult) -> None:
        seen.append(result)
        threads.add(threading.current_thread().name)

    requests = [{"name": n, "address": started[n].address} for n in names[:6]] + \
        [FleetRequest(n, started[n].address) for n in names[6:]]
    summary = api.bind_many(requests, parallel=4, on_progress=progress)
    assert summary.exit_code == 0 and summary.count("bound") == 12
    assert sorted(r.name for r in seen) == sorted(names)
    assert threads == {threading.current_thread().name}  # called in the caller's thread: no locking needed
    assert all(started[n].state()["bound"] is True for n in names)
    # Every K is out of the database file and its -wal once bind_many returns (one checkpoint
    # at its end).
    for path in (api.home.db_file, api.home.db_file.with_name("imprint.db-wal")):
        data = path.read_bytes() if path.exists() else b""
        assert not any(tokens.parse(k).payload in data or k.split("-", 1)[1].encode() in data
                       for k in issued.values()), path
    # One connection for every thread: this process has the database open once.
    open_db = [fd for fd in os.listdir("/proc/self/fd")
               if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(api.home.db_file)]
    assert len(open_db) == 1, open_db
    again = api.bind_many(requests, parallel=4)
    assert again.count("already-bound") == 12
    with pytest.raises(UsageError, match="also"):
        api.bind_many([requests[0], requests[0]])
    with pytest.raises(UsageError, match="address is missing"):
        api.bind_many([{"name": "vm0"}])
    stop = threading.Event()
    stop.set()
    assert api.bind_many([FleetRequest("vm99", "127.0.0.1:1")], stop=stop).count("not-started") == 1


def test_the_controller_example_runs(tmp_path: Path) -> None:
    home = tmp_path / "controller-home"
    result = subprocess.run([sys.executable, str(REPO / "docs" / "examples" / "controller.py"), "--home", str(home),
                             "--vms", "4", "--work", str(tmp_path / "site")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 bound" in result.stdout, result.stdout
    owner = Owner(home)
    assert sorted((r.vm, r.state) for r in owner.vms()) == [(f"app{i}", "bound") for i in range(1, 5)]


class socket_closed:
    """A port bound but not listening: a connect is refused at once."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return int(self._sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self._sock.close()
