"""`imprint bind --from` against real agents: a mixed fleet binds its good VMs and reports the
others with their exit codes, a rerun binds nothing twice, SIGINT half-way leaves every VM bound
or untouched with its audit entry, two processes on one home bind each VM once, and the progress
bar appears on a real pseudo-terminal only."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from imprint import crypto, tokens

from tests.helpers import Agent, AgentFactory, Owner

GOOD, WRONG, UNREACHABLE = 40, 5, 5


@dataclass
class Fleet:
    owner: Owner
    lines: list[dict[str, str]]
    good: list[str]
    wrong: list[str]
    unreachable: list[str]
    agents: dict[str, Agent]

    def write(self, path: Path) -> Path:
        path.write_text("".join(json.dumps(line) + "\n" for line in self.lines))
        return path


def closed_port() -> int:
    """A port nobody listens on (bound, not listening, then released: refused on connect)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_all(agents: AgentFactory, roots: dict[str, Path]) -> dict[str, Agent]:
    """Every agent started at once, then each awaited (start-up is most of the test's time)."""
    started = {name: agents.start(root, expect_ready=False) for name, root in roots.items()}
    for agent in started.values():
        agent.port = agents.await_ready(agent)
    return started


def make_fleet(agents: AgentFactory, owner: Owner, mode: str, good: int = GOOD, wrong: int = WRONG,
               unreachable: int = UNREACHABLE) -> Fleet:
    stranger = Owner.create(owner.home.parent / f"stranger-{mode}")
    roots: dict[str, Path] = {}
    names = {"good": [f"good{i}" for i in range(good)], "wrong": [f"wrong{i}" for i in range(wrong)],
             "unreachable": [f"gone{i}" for i in range(unreachable)]}
    for name in names["good"]:
        roots[name] = agents.make_root(owner.token(name, mode), name)
    for name in names["wrong"]:
        owner.token(name, mode)
        # Booted with another owner's token: shared, a K this owner never made; no secrets, the
        # VM token this owner is given is another VM's (below).
        roots[name] = agents.make_root(stranger.token(name, mode), name)
    for name in names["unreachable"]:
        owner.token(name, mode)
    started = start_all(agents, roots)
    lines = []
    for name in names["good"] + names["wrong"]:
        line = {"name": name, "address": started[name].address}
        if mode == "nosecret":
            line["vm_token"] = started[name].vm_token()
        lines.append(line)
    if mode == "nosecret":  # the wrong ones get a good VM's token: its key is not theirs
        for line in lines:
            if line["name"].startswith("wrong"):
                line["vm_token"] = started[names["good"][0]].vm_token()
    for name in names["unreachable"]:
        lines.append({"name": name, "address": f"127.0.0.1:{closed_port()}",
                      **({"vm_token": tokens.Token(tokens.TokenKind.VM, os.urandom(tokens.PAYLOAD_BYTES)).encode()}
                         if mode == "nosecret" else {})})
    return Fleet(owner, lines, names["good"], names["wrong"], names["unreachable"], started)


def results(stdout: str) -> tuple[dict[str, dict[str, object]], dict[str, object]]:
    rows = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    summary = rows.pop()["summary"]
    return {str(r["vm"]): r for r in rows}, summary


def db_rows(owner: Owner, query: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"file:{owner.home / 'imprint.db'}?mode=ro", uri=True)
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def assert_consistent(owner: Owner) -> None:
    """Every VM bound or untouched (no pending pin left by an interrupted bind), each bound VM
    with exactly one 'bound' audit entry and a spent token."""
    pins = dict(db_rows(owner, "SELECT vm, state FROM pins"))  # type: ignore[arg-type]
    assert set(pins.values()) <= {"bound"}, pins
    bound_entries = db_rows(owner, "SELECT vm, COUNT(*) FROM audit WHERE action = 'bind' AND outcome = 'bound' "
                                   "GROUP BY vm")
    assert dict(bound_entries) == {vm: 1 for vm in pins}, bound_entries  # type: ignore[arg-type]
    issued = {vm for (vm,) in db_rows(owner, "SELECT vm FROM tokens WHERE state = 'issued'")}
    assert not issued & set(pins), issued & set(pins)
    assert db_rows(owner, "SELECT vm FROM claims") == []


@pytest.mark.parametrize("mode", ["shared", "nosecret"])
def test_a_mixed_fleet_binds_the_good_ones_and_a_rerun_binds_nothing_twice(
        agents: AgentFactory, owner: Owner, tmp_path: Path, mode: str) -> None:
    fleet = make_fleet(agents, owner, mode)
    source = fleet.write(tmp_path / "fleet.jsonl")
    first = owner.run("bind", "--from", str(source), "--parallel", "8", check=None)
    by_vm, summary = results(first.stdout)
    assert first.returncode == 3, first.stderr  # a failed authentication outranks unreachable VMs
    assert {vm for vm, r in by_vm.items() if r["outcome"] == "bound"} == set(fleet.good)
    assert {vm: r["exit_code"] for vm, r in by_vm.items() if vm in fleet.wrong} == {vm: 3 for vm in fleet.wrong}
    assert {vm: r["exit_code"] for vm, r in by_vm.items() if vm in fleet.unreachable} == \
        {vm: 4 for vm in fleet.unreachable}
    assert summary["bound"] == GOOD and summary["failed"] == WRONG + UNREACHABLE and summary["exit_code"] == 3
    for vm in fleet.good:  # each agent pinned this owner, and the owner pinned that agent's key
        assert fleet.agents[vm].state()["bound"] is True
        key = crypto.certificate_spki((fleet.agents[vm].root / "var/lib/imprint/vm.crt").read_bytes())
        assert by_vm[vm]["vm_fingerprint"] == crypto.fingerprint(key)
    for vm in fleet.wrong:
        assert fleet.agents[vm].state().get("bound") is not True
    assert_consistent(owner)

    again = owner.run("bind", "--from", str(source), "--json", check=None)
    by_vm_again, summary_again = results(again.stdout)
    assert {vm for vm, r in by_vm_again.items() if r["outcome"] == "already-bound"} == set(fleet.good)
    assert summary_again["bound"] == 0 and summary_again["already_bound"] == GOOD
    assert_consistent(owner)
    entries = db_rows(owner, "SELECT COUNT(*) FROM audit WHERE action = 'bind' AND outcome = 'bound'")
    assert entries == [(GOOD,)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_half_way_leaves_every_vm_bound_or_untouched(
        agents: AgentFactory, owner: Owner, tmp_path: Path, sig: signal.Signals) -> None:
    fleet = make_fleet(agents, owner, "shared", good=24, wrong=0, unreachable=0)
    source = fleet.write(tmp_path / "fleet.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "imprint.owner", "--home", str(owner.home), "bind",
                             "--from", str(source), "--parallel", "2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen = [proc.stdout.readline() for _ in range(4)]  # four VMs have finished: half-way is under way
    assert all('"outcome": "bound"' in line for line in seen), seen
    proc.send_signal(sig)
    rest, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert f"{sig.name}: starting no new bind" in stderr and "Traceback" not in stderr
    by_vm, summary = results("".join(seen) + rest)
    assert summary["interrupted"] is True and summary["not_started"] > 0
    assert summary["bound"] + summary["not_started"] == 24
    assert_consistent(owner)
    bound = {vm for (vm,) in db_rows(owner, "SELECT vm FROM pins WHERE state = 'bound'")}
    assert bound == {vm for vm, r in by_vm.items() if r["outcome"] == "bound"}
    for vm in fleet.good:  # the agents agree: bound exactly when the owner says so
        assert (fleet.agents[vm].state().get("bound") is True) == (vm in bound), vm
    # What was not started binds on the rerun.
    rerun = owner.run("bind", "--from", str(source), "--json")
    assert results(rerun.stdout)[1]["bound"] == 24 - len(bound)


def test_two_processes_on_one_home_bind_each_vm_once(agents: AgentFactory, owner: Owner, tmp_path: Path) -> None:
    fleet = make_fleet(agents, owner, "shared", good=20, wrong=0, unreachable=0)
    source = fleet.write(tmp_path / "fleet.jsonl")
    cmd = [sys.executable, "-m", "imprint.owner", "--home", str(owner.home), "bind", "--from", str(source),
           "--parallel", "4", "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    per_process = [results(out)[0] for out, _ in outputs]
    for vm in fleet.good:
        outcomes = sorted(str(rows[vm]["outcome"]) for rows in per_process)
        assert outcomes == ["already-bound", "bound"], (vm, outcomes)
    assert_consistent(owner)
    assert db_rows(owner, "SELECT COUNT(*) FROM audit WHERE action = 'bind' AND outcome = 'bound'") == [(20,)]


def read_pty(fd: int, proc: subprocess.Popen[bytes], deadline: float) -> bytes:
    out = bytearray()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return bytes(out)


@pytest.fixture
def small_fleet(agents: AgentFactory, owner: Owner, tmp_path: Path) -> Iterator[tuple[Fleet, Path]]:
    fleet = make_fleet(agents, owner, "shared", good=6, wrong=0, unreachable=1)
    yield fleet, fleet.write(tmp_path / "fleet.jsonl")


def test_the_progress_bar_is_drawn_on_a_terminal(small_fleet: tuple[Fleet, Path]) -> None:
    fleet, source = small_fleet
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "imprint.owner", "--home", str(fleet.owner.home), "bind",
                             "--from", str(source), "--parallel", "2"],
                            stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    try:
        output = read_pty(leader, proc, time.monotonic() + 120).decode(errors="replace")
    finally:
        os.close(leader)
    assert proc.wait(timeout=30) == 4, output
    assert "\r\x1b[K[" in output and "7/7" in output, output  # the bar, redrawn in place
    assert "gone0: exit 4:" in output  # the failure on its own line
    assert "7 VMs in" in output and "6 bound, 0 already bound, 1 failed; exit 4" in output
    assert "{" not in output  # no JSON on a terminal


def test_no_progress_bar_when_piped(small_fleet: tuple[Fleet, Path]) -> None:
    fleet, source = small_fleet
    result = fleet.owner.run("bind", "--from", str(source), check=4)
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    by_vm, summary = results(result.stdout)
    assert len(by_vm) == 7 and summary["bound"] == 6


def test_a_malformed_file_binds_nothing(agents: AgentFactory, owner: Owner, tmp_path: Path) -> None:
    fleet = make_fleet(agents, owner, "shared", good=2, wrong=0, unreachable=0)
    source = tmp_path / "fleet.jsonl"
    source.write_text(json.dumps(fleet.lines[0]) + "\n" + '{"name": "good1", "address": 7}\n')
    result = owner.run("bind", "--from", str(source), check=2)
    assert "line 2: VM good1: address is missing or not a string" in result.stderr
    assert "nothing was bound" in result.stderr
    assert db_rows(owner, "SELECT COUNT(*) FROM pins") == [(0,)]
    assert fleet.agents["good0"].state().get("bound") is not True


def test_boot_records_and_stdin_are_read(agents: AgentFactory, owner: Owner) -> None:
    """`imprint-site boot` prints a record per VM (pretty JSON, agent_address, vm_token, no name):
    piped in with --name, they bind."""
    names = ["web1", "web2"]
    started = start_all(agents, {n: agents.make_root(owner.token(n, "nosecret"), n) for n in names})
    records = "".join(json.dumps({"run_dir": f"/tmp/{n}", "agent_address": started[n].address,
                                  "vm_token": started[n].vm_token(), "status": "ready"}, indent=2) + "\n"
                      for n in names)
    result = subprocess.run([sys.executable, "-m", "imprint.owner", "--home", str(owner.home), "bind", "--from", "-",
                             "--name", "web{n}"], input=records, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    by_vm, summary = results(result.stdout)
    assert summary["bound"] == 2 and set(by_vm) == set(names)
