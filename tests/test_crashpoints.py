"""kill -9 at every durable step, systematically: of a bind in each mode and of the applies of
the ssh, x509, kerberos (a real MIT KDC) and cloudinit (Debian's cloud-init in a chroot)
backends, on the agent's side and on the owner's.

Each scenario runs once with IMPRINT_CRASHPOINT_TRACE on both sides, which lists every crash
point (imprint.faults) the real processes reach. Then, for each point reached (the N-th time,
when a name repeats): from a fresh copy of the same start, the step runs with
IMPRINT_CRASHPOINT naming that point on that side; the process must die by SIGKILL there; what
it left must parse (no half-written file); the crashed side restarts (the agent) or reruns (the
owner's command), and the step must then complete. Afterwards: no temp file is left, every
state file parses, the database passes PRAGMA integrity_check, the pinned channel works, and K
is neither in the owner's database (nor its WAL) nor in the agent's state; after an apply, the
backend's files are what a clean apply makes and a further apply changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509 as crypto_x509
from cryptography.hazmat.primitives import serialization as crypto_serialization
from imprint import crypto, tokens
from imprint.faults import TARGET_ENV, TRACE_ENV
from imprint.fsatomic import TEMP_MARK
from imprint.guest.state import AgentState

from tests.helpers import READY_TIMEOUT, Agent, AgentFactory, Owner
from tests.helpers.agents import listening_port
from tests.krb5kit import ADMIN, REALM, Realm, needs_krb5
from tests.sshkit import keygen, needs_root, seed_root
from tests.test_backend_cloudinit import DOCUMENT, KEY, make_chroot, needs_chroot

MODES = ["shared", "nosecret"]
TOKEN_BYTES = re.compile(rb"imprint1s-[a-z2-7]{40,}")
VM = "web1"


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
    """Set (or, with None, remove) variables for the child processes started inside the block.
    This test process reaches no crash point itself: it only starts processes in the block."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _side_env(crash: str | None = None, trace: Path | None = None) -> dict[str, str | None]:
    return {TARGET_ENV: crash, TRACE_ENV: str(trace) if trace else None}


def read_trace(path: Path) -> list[str]:
    """The points in the order reached, each as NAME#N (N-th time the process reached NAME)."""
    seen: dict[str, int] = {}
    points = []
    for name in path.read_text().splitlines() if path.exists() else []:
        seen[name] = seen.get(name, 0) + 1
        points.append(f"{name}#{seen[name]}")
    return points


def _ready_or_dead(agent: Agent) -> int | None:
    """The agent's port once it says READY, or None once it has exited (whichever comes first)."""
    pidfd = os.pidfd_open(agent.proc.pid)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(agent.notify, selectors.EVENT_READ)
            selector.register(pidfd, selectors.EVENT_READ)
            deadline = time.monotonic() + READY_TIMEOUT
            while True:
                events = selector.select(timeout=max(0.0, deadline - time.monotonic()))
                if not events:
                    raise AssertionError(f"agent neither ready nor dead in {READY_TIMEOUT} s:\n{agent.log()}")
                for key, _ in events:
                    if key.fileobj is not agent.notify:
                        agent.proc.wait(timeout=READY_TIMEOUT)
                        return None
                    message = agent.notify.recv(4096).decode()
                    if "READY=1" in message:
                        return listening_port(message)
                    if "STATUS=failed" in message:
                        raise AssertionError(f"agent failed: {message}\n{agent.log()}")
    finally:
        os.close(pidfd)


def _no_traceback(text: str, who: str) -> None:
    assert "Traceback" not in text, f"{who} ended in a traceback:\n{text}"


# -- the hook itself, and what write_atomic does with the temp files a crash leaves


def _hook(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", f"from imprint.faults import crashpoint\n{code}"],
                          env={k: v for k, v in os.environ.items() if k not in (TARGET_ENV, TRACE_ENV)} | env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_crashpoint_kills_at_the_nth_reach_and_traces_every_point(tmp_path: Path) -> None:
    code = "crashpoint('a.written'); crashpoint('b'); crashpoint('a.written'); print('survived')"
    trace = tmp_path / "trace"
    killed = _hook(code, **{TARGET_ENV: "a.written#2", TRACE_ENV: str(trace)})
    assert killed.returncode == -signal.SIGKILL and killed.stdout == ""
    assert read_trace(trace) == ["a.written#1", "b#1", "a.written#2"]  # the fatal point is traced first
    assert _hook(code, **{TARGET_ENV: "b"}).returncode == -signal.SIGKILL
    assert _hook(code, **{TARGET_ENV: "a.written#3"}).stdout == "survived\n"
    assert _hook(code, **{TARGET_ENV: "a"}).stdout == "survived\n"  # names match whole, not by prefix
    assert _hook(code).stdout == "survived\n"


def test_write_atomic_removes_temps_of_dead_writers_only(tmp_path: Path) -> None:
    from imprint.fsatomic import remove_stale_temps, temp_name, write_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    live = str(os.getppid())  # pytest's parent: alive while this test runs
    for pid in (dead, live):
        (tmp_path / temp_name("state.json", int(pid))).write_text("{half")
        (tmp_path / temp_name("vm.key", int(pid))).write_text("half")
    write_atomic(tmp_path / "state.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["state.json", temp_name("state.json", int(live)), temp_name("vm.key", int(dead)),
         temp_name("vm.key", int(live))])
    remove_stale_temps(tmp_path)  # the agent's sweep at start: every dead writer's temp
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["state.json", temp_name("state.json", int(live)), temp_name("vm.key", int(live))])


# -- one world: an owner home and a guest root, copied fresh from a template for every point


@dataclass
class World:
    dir: Path
    owner: Owner
    root: Path
    agents: AgentFactory
    mode: str
    token: str
    agent: Agent | None = None
    vm_token: str | None = None

    @property
    def state(self) -> AgentState:
        return AgentState(self.root / "var/lib/imprint")

    def copy(self, dest: Path) -> World:
        shutil.copytree(self.dir, dest, symlinks=True)
        return World(dest, Owner(dest / "owner-home"), dest / "vm", self.agents, self.mode, self.token,
                     vm_token=self.vm_token)

    def start_agent(self, crash: str | None = None, trace: Path | None = None) -> Agent | None:
        """The agent on this world's root; None if it died before READY."""
        with _env(**_side_env(crash, trace)):
            agent = self.agents.start(self.root, expect_ready=False)
        self.agent = agent
        port = _ready_or_dead(agent)
        if port is None:
            return None
        agent.port = port
        if self.mode == "nosecret" and not self.state.load_record().bound:
            self.vm_token = agent.vm_token()
        return agent

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.agent.kill()
            self.agent.notify.close()
            self.agent = None

    def owner_run(self, *args: str, crash: str | None = None, trace: Path | None = None,
                  ) -> subprocess.CompletedProcess[str]:
        with _env(**_side_env(crash, trace)):
            return self.owner.run(*args, check=None)

    @property
    def address(self) -> str:
        assert self.agent is not None
        return self.agent.address

    def bind(self, crash: str | None = None, trace: Path | None = None) -> subprocess.CompletedProcess[str]:
        args = ["bind", VM, "--address", self.address]
        if self.mode == "nosecret":
            assert self.vm_token is not None
            args += ["--vm-token", self.vm_token]
        return self.owner_run(*args, crash=crash, trace=trace)


def make_world(base: Path, agents: AgentFactory, mode: str) -> World:
    from tests.helpers import agentroot

    base.mkdir(parents=True)
    owner = Owner.create(base / "owner-home")
    token = owner.token(VM, mode)
    return World(base, owner, agentroot.make_root(base, "vm", token), agents, mode, token)


# -- what must hold after a crash, and after the rerun


def assert_nothing_half_written(world: World) -> None:
    """Every state file that exists is whole: keys and certificates load, state.json parses."""
    state, home = world.state, world.owner.home
    for key in (state.key_file, home / "owner.key"):
        if key.exists():
            crypto.PrivateKey.from_pem(key.read_bytes())
    for cert in [state.cert_file, state.owner_cert_file, home / "owner.crt", *sorted(home.glob("pins/*"))]:
        if cert.exists():
            crypto.certificate_spki(cert.read_bytes())
    if state.record_file.exists():
        state.load_record()


def _temps(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs if d.exists() for p in d.rglob("*") if TEMP_MARK in p.name)


def assert_bound_and_clean(world: World, *extra_dirs: Path) -> None:
    assert_nothing_half_written(world)
    home, state = world.owner.home, world.state
    assert _temps(state.dir, home, *extra_dirs) == [], "temp files left behind"
    record = state.load_record()
    assert record.bound and record.mode == world.mode, record
    if world.mode == "shared":
        secrets = [world.token.split("-", 1)[1].encode(), tokens.parse(world.token).payload]
        # Raw bytes first: opening the database (below) may checkpoint and remove the WAL.
        for path in [home / "imprint.db", home / "imprint.db-wal", *sorted(state.dir.rglob("*"))]:
            if path.is_file():
                assert not any(s in path.read_bytes() for s in secrets), f"K is left in {path}"
    db = sqlite3.connect(f"file:{home / 'imprint.db'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        pin = db.execute("SELECT state, vm_fingerprint FROM pins WHERE vm = ?", (VM,)).fetchone()
        token = db.execute("SELECT state FROM tokens WHERE vm = ? ORDER BY id DESC LIMIT 1", (VM,)).fetchone()
        outcomes = [row[0] for row in db.execute("SELECT outcome FROM audit WHERE vm = ? AND action = 'bind'", (VM,))]
    finally:
        db.close()
    # The "bound" entry is written in the pin's own transaction: no kill can bind without it.
    assert outcomes.count("bound") == 1, f"the audit log's bind outcomes are {outcomes}"
    assert pin is not None and pin[0] == "bound", f"the owner's pin is {pin}"
    assert token == ("consumed",), f"the owner's token is {token} after the bind"
    status = world.owner_run("status", VM, "--address", world.address, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["vm_fingerprint"] == pin[1]


# -- the engine: trace once, then a kill -9 at each point


Step = Callable[[World, "str | None", "Path | None"], subprocess.CompletedProcess[str]]


@dataclass
class Scenario:
    """``step`` runs the owner's command against the running agent (crash point / trace for the
    owner's process); ``finish`` asserts that the step's work is complete and clean;
    ``done_before`` recognises the clear refusal a rerun rightly gives when the killed run had
    already finished the work (``finish`` still checks that it had)."""

    name: str
    step: Step
    finish: Callable[[World], None]
    done_before: Callable[[subprocess.CompletedProcess[str]], bool] = lambda result: False


@dataclass
class Coverage:
    agent: list[str]
    owner: list[str]


def trace_points(template: World, scenario: Scenario, base: Path) -> Coverage:
    world = template.copy(base)
    agent_trace, owner_trace = base / "agent.trace", base / "owner.trace"
    assert world.start_agent(trace=agent_trace) is not None
    result = scenario.step(world, None, owner_trace)
    assert result.returncode == 0, f"{scenario.name} without a crash:\n{result.stdout}\n{result.stderr}"
    # The step's points only: the checks after it make requests of their own (each pinned
    # request advances the session counter, a durable write of its own scenario).
    coverage = Coverage(read_trace(agent_trace), read_trace(owner_trace))
    scenario.finish(world)
    world.stop_agent()
    return coverage


def crash_and_recover(template: World, scenario: Scenario, base: Path, side: str, point: str) -> None:
    world = template.copy(base)
    if side == "agent":
        agent = world.start_agent(crash=point)
        if agent is not None:  # not a first-boot point: the agent dies during the step
            first = scenario.step(world, None, None)
            _no_traceback(first.stderr, "imprint")
        assert world.agent is not None
        try:
            code = world.agent.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the agent did not reach {point} in a run identical to the traced one: a crash "
                                 "point must be named by its purpose, not by something that changes per run "
                                 "(a PID, a time)") from None
        assert code == -signal.SIGKILL, f"agent exited {code}, not by SIGKILL at {point}:\n{world.agent.log()}"
        world.agent = None
        assert_nothing_half_written(world)
        assert world.start_agent() is not None
    else:
        assert world.start_agent() is not None
        first = scenario.step(world, point, None)
        assert first.returncode == -signal.SIGKILL, (
            f"imprint exited {first.returncode}, not by SIGKILL at {point}:\n{first.stdout}\n{first.stderr}")
        assert_nothing_half_written(world)
    again = scenario.step(world, None, None)
    assert again.returncode == 0 or scenario.done_before(again), (
        f"after a kill -9 at {side}:{point} the rerun exited {again.returncode}:\n{again.stdout}\n{again.stderr}")
    _no_traceback(again.stderr, "imprint")
    scenario.finish(world)
    world.stop_agent()


def run_all(template: World, scenario: Scenario, base: Path) -> Coverage:
    """Every point of the traced step, on both sides; all failures reported together."""
    coverage = trace_points(template, scenario, base / "trace")
    failures = []
    for side, points in (("agent", coverage.agent), ("owner", coverage.owner)):
        for i, point in enumerate(points):
            try:
                crash_and_recover(template, scenario, base / f"{side}-{i}", side, point)
            except AssertionError as exc:
                failures.append(f"{side}:{point}: {str(exc).split(chr(10) + 'assert ')[0]}")
    total = len(coverage.agent) + len(coverage.owner)
    print(f"{scenario.name}: {total - len(failures)} of {total} crash points recovered "
          f"({len(coverage.agent)} on the agent, {len(coverage.owner)} on the owner)")
    assert not failures, f"{scenario.name}: {len(failures)} crash point(s) not recovered:\n" + "\n\n".join(failures)
    return coverage


# -- the bind


def _bind_step(world: World, crash: str | None, trace: Path | None) -> subprocess.CompletedProcess[str]:
    return world.bind(crash=crash, trace=trace)


def _already_bound(result: subprocess.CompletedProcess[str]) -> bool:
    """The owner was killed after its bind committed: the rerun says so (exit 2, usage)."""
    return result.returncode == 2 and f"{VM} is already bound to VM key" in result.stderr


BIND = Scenario("bind", _bind_step, assert_bound_and_clean, _already_bound)


@pytest.mark.parametrize("mode", MODES)
def test_kill_at_every_point_of_a_bind(agents: AgentFactory, tmp_path: Path, mode: str) -> None:
    template = make_world(tmp_path / "template", agents, mode)
    coverage = run_all(template, BIND, tmp_path / "runs")
    # The durable writes the bind must reach, on both sides (a point that vanished is a regression).
    agent_names = {p.split("#")[0] for p in coverage.agent}
    for label in ("agent.identity-key", "agent.identity-cert", "agent.bind-record"):
        assert {f"{label}.written", f"{label}.renamed", f"{label}.synced"} <= agent_names, agent_names
    assert {"agent.owner-cert.written", "agent.owner-cert.renamed"} <= agent_names
    assert {"store.commit.before#1", "store.commit.after#1"} <= set(coverage.owner), coverage.owner


# -- backend applies: from a bound VM, `imprint apply` with a profile


def bound_template(base: Path, agents: AgentFactory, seed: Callable[[Path], object]) -> World:
    """A shared-mode world, bound (agent stopped), its root prepared by ``seed`` first."""
    template = make_world(base, agents, "shared")
    seed(template.root)
    assert template.start_agent() is not None
    bound = template.bind()
    assert bound.returncode == 0, bound.stderr
    template.stop_agent()
    return template


def apply_scenario(name: str, profile: Path, check: Callable[[World], None]) -> Scenario:
    def step(world: World, crash: str | None, trace: Path | None) -> subprocess.CompletedProcess[str]:
        return world.owner_run("apply", VM, "--profile", str(profile), "--address", world.address, "--json",
                               crash=crash, trace=trace)

    def finish(world: World) -> None:
        assert_bound_and_clean(world, world.root)
        check(world)
        again = step(world, None, None)
        assert again.returncode == 0, again.stderr
        results = json.loads(again.stdout)["results"]
        assert all(r["changed"] is False for r in results.values()), f"a third apply still changed: {results}"

    return Scenario(name, step, finish)


@needs_root
def test_kill_at_every_point_of_an_ssh_apply(agents: AgentFactory, tmp_path: Path) -> None:
    key = keygen(tmp_path / "alice", "alice@owner")
    profile = tmp_path / "profile.toml"
    profile.write_text(f'[ssh]\nusers = [{{name = "alice", authorized_keys = ["{key}"], sudo = true}}]\n')

    def check(world: World) -> None:
        keys = world.root / "home/alice/.ssh/authorized_keys"
        assert keys.read_text() == key + "\n"
        assert stat.S_IMODE(keys.stat().st_mode) == 0o600
        assert (world.root / "etc/sudoers.d/imprint-alice").read_text().endswith("NOPASSWD: ALL\n")
        for kind in ("ed25519", "ecdsa", "rsa"):
            host_key = world.root / f"etc/ssh/ssh_host_{kind}_key"
            assert subprocess.run(["ssh-keygen", "-l", "-f", str(host_key)], capture_output=True).returncode == 0
        known_hosts = world.owner.home / "known_hosts" / VM
        assert len([line for line in known_hosts.read_text().splitlines() if line and line[0] != "#"]) == 3

    def seed(root: Path) -> None:
        seed_root(root)
        # The image's host keys, made once: ssh-keygen -A writes them itself (no crash point of
        # imprint's) and an RSA key per run would dominate the test's time.
        subprocess.run(["ssh-keygen", "-A", "-f", str(root)], check=True, capture_output=True)

    template = bound_template(tmp_path / "template", agents, seed)
    coverage = run_all(template, apply_scenario("ssh apply", profile, check), tmp_path / "runs")
    assert any(".authorized_keys." in p for p in coverage.agent), coverage.agent
    assert any(p.startswith(f"{VM}.") for p in coverage.owner), coverage.owner


@needs_root
def test_kill_at_every_point_of_an_x509_apply(agents: AgentFactory, tmp_path: Path) -> None:
    profile = tmp_path / "profile.toml"
    profile.write_text('[x509]\nnames = ["www.test.example"]\ninclude_addresses = false\n')

    def check(world: World) -> None:
        ssl = world.root / "etc/ssl"
        ca = world.owner.home / "x509_ca.pem"
        for name in ("imprint.pem", "imprint-fullchain.pem"):
            verified = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(ssl / "certs" / name)],
                                      capture_output=True, text=True)
            assert verified.returncode == 0, verified.stdout + verified.stderr
        assert (ssl / "certs/imprint-chain.pem").read_bytes() == ca.read_bytes()
        key = crypto_serialization.load_pem_private_key((ssl / "private/imprint.key").read_bytes(), None)
        cert = crypto_x509.load_pem_x509_certificate((ssl / "certs/imprint.pem").read_bytes())
        spki = (crypto_serialization.Encoding.DER, crypto_serialization.PublicFormat.SubjectPublicKeyInfo)
        assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki), \
            "the installed certificate is not for the installed key"

    def seed(root: Path) -> None:
        (root / "etc/ssl/certs").mkdir(parents=True)

    template = bound_template(tmp_path / "template", agents, seed)
    template.owner.run("ca", "init", "--x509")
    coverage = run_all(template, apply_scenario("x509 apply", profile, check), tmp_path / "runs")
    assert any(".imprint.key." in p for p in coverage.agent), coverage.agent
    assert any(".imprint.pem." in p for p in coverage.agent), coverage.agent


@needs_root
@needs_krb5
def test_kill_at_every_point_of_a_kerberos_apply(agents: AgentFactory, tmp_path: Path) -> None:
    realm = Realm(tmp_path / "realm").start()
    try:
        profile = tmp_path / "profile.toml"
        profile.write_text(f'[kerberos]\nrealm = "{REALM}"\nkdc = ["{realm.kdc}"]\n'
                           f'admin_server = "{realm.admin_server}"\nadmin_principal = "{ADMIN}"\n'
                           f'admin_keytab = "{realm.admin_keytab}"\n')
        host = f"host/{VM}.{REALM.lower()}@{REALM}"

        def check(world: World) -> None:
            # The KDC rekeys whenever an attempt found the VM without the current key: whatever
            # the VM holds now must be that current key.
            got = realm.kinit(world.root / "etc/krb5.keytab", host)
            assert got.returncode == 0, got.stderr

        def seed(root: Path) -> None:
            (root / "etc").mkdir()
            (root / "etc/krb5.conf").write_text("[libdefaults]\n    default_realm = ATHENA.MIT.EDU\n")

        template = bound_template(tmp_path / "template", agents, seed)
        coverage = run_all(template, apply_scenario("kerberos apply", profile, check), tmp_path / "runs")
        assert any(".krb5.keytab." in p for p in coverage.agent), coverage.agent
    finally:
        realm.stop()


CHROOT_WRAPPER = """#!/bin/sh
root= prev=
for arg in "$@"; do [ "$prev" = --root ] && root=$arg; prev=$arg; done
[ -n "$root" ] || exec {python} "$@"
exec unshare --mount --propagation private -- sh -ec \\
  'mount --bind -o ro /usr "$0/usr"; mount --bind /dev/null "$0/dev/null"; exec "$@"' "$root" {python} "$@"
"""


@needs_chroot
def test_kill_at_every_point_of_a_cloudinit_apply(agents: AgentFactory, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "web1.user-data").write_text(DOCUMENT)
    profile = tmp_path / "profile.toml"
    profile.write_text(f'[cloudinit]\nfile = "{tmp_path / "web1.user-data"}"\n')

    def check(world: World) -> None:
        root = world.root
        assert (root / "srv/hello.txt").read_text() == "hello from the owner"
        assert (root / "home/alice/.ssh/authorized_keys").read_text().strip() == KEY
        assert (root / "home/alice/notes.txt").read_text() == "written after alice exists"
        assert [line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("alice:")]

    # Every world is a copy of the root at another path: this wrapper (the fixtures' python)
    # enters the root named by the agent's --root, as make_chroot's wrapper does for one root.
    wrapper = tmp_path / "any-root-python"  # make_chroot writes its own as chroot-python
    wrapper.write_text(CHROOT_WRAPPER.format(python=sys.executable))
    wrapper.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(wrapper))

    def seed(root: Path) -> None:
        make_chroot(root, tmp_path)

    template = bound_template(tmp_path / "template", agents, seed)
    coverage = run_all(template, apply_scenario("cloudinit apply", profile, check), tmp_path / "runs")
    assert coverage.agent, coverage.agent


# -- the owner alone: a new token supersedes the old one (and wipes its K)


def test_kill_at_every_point_of_a_token_superseding_another(tmp_path: Path) -> None:
    template = Owner(tmp_path / "template" / "owner-home")
    template.run("init")
    first = template.token(VM, "shared")
    trace = tmp_path / "trace"
    traced = _copy_owner(template, tmp_path / "traced")
    with _env(**_side_env(None, trace)):
        assert traced.run("token", "new", VM, "--mode", "shared").returncode == 0
    points = read_trace(trace)
    assert "store.commit.after#1" in points, points
    for i, point in enumerate(points):
        owner = _copy_owner(template, tmp_path / f"owner-{i}")
        with _env(**_side_env(point)):
            killed = owner.run("token", "new", VM, "--mode", "shared", check=None)
        assert killed.returncode == -signal.SIGKILL, f"{point}: exit {killed.returncode}\n{killed.stderr}"
        db_file = owner.home / "imprint.db"
        files = (db_file, db_file.with_name("imprint.db-wal"))
        # Every K the killed run left (its own, if it committed), as raw bytes, before the rerun.
        left = {first.encode()} | {m for f in files if f.exists() for m in TOKEN_BYTES.findall(f.read_bytes())}
        last = owner.token(VM, "shared")  # the rerun
        for path in files:
            if path.exists():
                data = path.read_bytes()
                for k in left - {last.encode()}:
                    assert k.split(b"-", 1)[1] not in data, f"{point}: a superseded K is in {path}"
        db = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
        try:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            issued = db.execute("SELECT token_text FROM tokens WHERE vm = ? AND state = 'issued'", (VM,)).fetchall()
        finally:
            db.close()
        assert issued == [(last,)], f"{point}: issued tokens {len(issued)} after the rerun"


def _copy_owner(template: Owner, dest: Path) -> Owner:
    shutil.copytree(template.home, dest / "owner-home")
    return Owner(dest / "owner-home")
