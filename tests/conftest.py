"""Fixtures that run the real programs: `imprint-agent` processes and the `imprint` CLI.

Readiness is synchronised through systemd's own protocol: each agent gets a NOTIFY_SOCKET that
the test listens on, and "READY=1" with the listening port arrives there. No sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import agentroot

READY_TIMEOUT = 30.0


@dataclass
class Agent:
    root: Path
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    notify: socket.socket

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def console(self) -> Path:
        return self.root / "dev" / "console"

    def log(self) -> str:
        return self.log_path.read_text()

    def vm_token(self) -> str:
        found = re.findall(r"IMPRINT-VM-TOKEN (imprint1v-[a-z2-7]+)", self.console.read_text())
        assert found, f"no VM token on the console; agent log:\n{self.log()}"
        return found[-1]

    def state(self) -> dict[str, object]:
        path = self.root / "var/lib/imprint/state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)


@dataclass
class AgentFactory:
    base: Path
    started: list[Agent] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)

    def make_root(self, token: str | None, name: str = "vm") -> Path:
        return agentroot.make_root(self.base, name, token)

    def start(self, root: Path, *extra: str, port: int = 0, expect_ready: bool = True) -> Agent:
        sock_dir = tempfile.mkdtemp(prefix="imprint-notify-")  # short path: AF_UNIX limits it to 107 bytes
        sock_path = os.path.join(sock_dir, "n")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(sock_path)
        self.sockets.append(sock_path)
        notify.settimeout(READY_TIMEOUT)
        log_path = root.parent / f"{root.name}-agent-{len(self.started)}.log"
        env = dict(os.environ, NOTIFY_SOCKET=sock_path, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "imprint.guest", "run", "--root", str(root),
               "--listen", f"127.0.0.1:{port}", "--announce-interval", "3600", *extra]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        agent = Agent(root=root, proc=proc, port=0, log_path=log_path, notify=notify)
        self.started.append(agent)
        if expect_ready:
            agent.port = self.await_ready(agent)
        return agent

    def await_ready(self, agent: Agent) -> int:
        while True:
            try:
                message = agent.notify.recv(4096).decode()
            except TimeoutError:
                raise AssertionError(f"agent not ready in {READY_TIMEOUT} s:\n{agent.log()}") from None
            if "READY=1" in message:
                match = re.search(r"listening on [^ ]+:(\d+)", message)
                assert match, message
                return int(match.group(1))
            if "STATUS=failed" in message:
                raise AssertionError(f"agent failed: {message}\n{agent.log()}")

    def cleanup(self) -> None:
        for agent in self.started:
            agent.kill()
            agent.notify.close()
        for path in self.sockets:
            with contextlib.suppress(OSError):
                os.unlink(path)
                os.rmdir(os.path.dirname(path))


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[AgentFactory]:
    factory = AgentFactory(tmp_path)
    yield factory
    factory.cleanup()


@dataclass
class Owner:
    home: Path

    def run(self, *args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "imprint.owner", "--home", str(self.home), *args],
            capture_output=True, text=True, timeout=120,
        )
        if check is not None:
            assert result.returncode == check, (
                f"imprint {' '.join(args)} exited {result.returncode}, expected {check}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def token(self, name: str, mode: str) -> str:
        return self.run("token", "new", name, "--mode", mode).stdout.strip().splitlines()[-1]

    def json(self, *args: str, check: int | None = 0) -> dict[str, object]:
        result = self.run(*args, "--json", check=check)
        data: dict[str, object] = json.loads(result.stdout)
        return data


@pytest.fixture
def owner(tmp_path: Path) -> Owner:
    o = Owner(tmp_path / "owner-home")
    o.run("init")
    return o


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots real QEMU VMs from the image-build image (CI runs them)")
    config.addinivalue_line("markers", "slow: long-running (CI runs them)")
