"""Real `imprint-agent run` processes, the one harness of the tests, the benchmarks and the demo.

Readiness is synchronised through systemd's own protocol: each agent gets a NOTIFY_SOCKET that
this process listens on, and "READY=1" with the listening port arrives there. No sleeps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imprint import tokens

from tests.helpers import agentroot

READY_TIMEOUT = 30.0
AGENT_MODULE = ("-m", "imprint.guest")
_LISTENING = re.compile(r"listening on [^ ]+:(\d+)")


class NotReady(AssertionError):
    """The process failed, or did not send READY=1 in time (an AssertionError: a test fails)."""


class NotifySocket:
    """The listening end of systemd's notification protocol: one datagram socket at a short path
    (AF_UNIX limits it to 107 bytes, so not under pytest's long tmp_path)."""

    def __init__(self, timeout: float = READY_TIMEOUT) -> None:
        self._dir = tempfile.mkdtemp(prefix="imprint-notify-")
        self.path = os.path.join(self._dir, "n")
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(timeout)

    def recv(self, size: int = 4096) -> bytes:
        return self._sock.recv(size)

    def fileno(self) -> int:  # for selectors: a test may wait on the agent's exit too
        return self._sock.fileno()

    def wait_ready(self, log: Callable[[], str]) -> str:
        """The READY=1 message; NotReady (with ``log()``) on STATUS=failed or after the timeout."""
        while True:
            try:
                message = self.recv().decode()
            except TimeoutError:
                raise NotReady(f"not ready in {self.timeout:g} s:\n{log()}") from None
            if "READY=1" in message:
                return message
            if "STATUS=failed" in message:
                raise NotReady(f"agent failed: {message}\n{log()}")

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def listening_port(message: str) -> int:
    """The port of the agent's READY=1 message ("... listening on HOST:PORT ...")."""
    match = _LISTENING.search(message)
    if match is None and "no inbound port" in message:
        return 0  # --listen none: the agent only dials its owner
    if match is None:
        raise NotReady(f"READY without a port: {message!r}")
    return int(match.group(1))


def with_prelude(prelude: str) -> tuple[str, str]:
    """A launcher that runs Python ``prelude`` in the agent process before the agent's main
    (a compromised agent, a patched library): the agent's arguments follow it unchanged."""
    main = f"{prelude}\nimport sys\nfrom imprint.guest.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return ("-c", main)


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def start_notifying(cmd: Sequence[str], log_path: Path, env: Mapping[str, str],
                    timeout: float = READY_TIMEOUT) -> tuple[subprocess.Popen[bytes], float, str]:
    """Run ``cmd`` (any program speaking the protocol) with a NOTIFY_SOCKET until READY=1;
    returns (process, seconds from just before Popen to READY=1, the message). Output is
    appended to ``log_path``."""
    notify = NotifySocket(timeout)
    try:
        with log_path.open("ab") as log:
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(env, NOTIFY_SOCKET=notify.path))
        try:
            message = notify.wait_ready(lambda: read_log(log_path))
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return proc, time.perf_counter() - started, message
    finally:
        notify.close()


@dataclass
class Agent:
    root: Path
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    notify: NotifySocket
    started: float = 0.0  # time.perf_counter() just before Popen
    ready_seconds: float = 0.0  # from Popen to READY=1: exec, imports, key generation, listen

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def console(self) -> Path:
        return self.root / "dev" / "console"

    def log(self) -> str:
        return read_log(self.log_path)

    def vm_token(self) -> str:
        """The last VM token the agent announced on its console, read as a site reads it."""
        found = tokens.find_vm_token_lines(read_log(self.console))
        if not found:
            raise AssertionError(f"no VM token on the console; agent log:\n{self.log()}")
        return found[-1].encode()

    def state(self) -> dict[str, object]:
        path = self.root / "var/lib/imprint/state.json"
        data: dict[str, object] = json.loads(path.read_text()) if path.exists() else {}
        return data

    def await_status(self, text: str, timeout: float = 60.0) -> str:
        """The agent's next systemd notification containing ``text`` (STATUS= "connected to the
        owner", ...); AssertionError with the agent's log when none comes within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no STATUS with {text!r} within {timeout:g} s:\n{self.log()}")
            self.notify._sock.settimeout(remaining)
            try:
                message = self.notify.recv().decode()
            except TimeoutError:
                continue
            if text in message:
                return message

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)


@dataclass
class AgentFactory:
    """Starts agents on guest roots under ``base``; :meth:`cleanup` kills every one it started.

    ``env``: the agents' environment (default: this process's); ``ready_timeout``: how long
    :meth:`await_ready` waits for READY=1."""

    base: Path
    env: Mapping[str, str] | None = None
    ready_timeout: float = READY_TIMEOUT
    started: list[Agent] = field(default_factory=list)

    def make_root(self, token: str | None, name: str = "vm") -> Path:
        return agentroot.make_root(self.base, name, token)

    def start(self, root: Path, *extra: str, port: int = 0, expect_ready: bool = True, log: Path | None = None,
              python_flags: Sequence[str] = (), launcher: Sequence[str] = AGENT_MODULE,
              program: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> Agent:
        """Start an agent on ``root`` with ``extra`` arguments; with ``expect_ready``, return once
        it sent READY=1. Its output is appended to ``log`` (O_APPEND: a console file the agent
        also announces on stays whole, as on a tty), by default a new file next to the root.
        The program is ``sys.executable [python_flags] launcher`` (``-m imprint.guest``, or
        :func:`with_prelude`), or ``program`` (an installed `imprint-agent`)."""
        log_path = log or root.parent / f"{root.name}-agent-{len(self.started)}.log"
        notify = NotifySocket(self.ready_timeout)
        child_env = dict(env or self.env or os.environ, NOTIFY_SOCKET=notify.path, PYTHONUNBUFFERED="1")
        cmd = [*(program or (sys.executable, *python_flags, *launcher)), "run", "--root", str(root),
               "--listen", f"127.0.0.1:{port}", "--announce-interval", "3600", *extra]
        with log_path.open("ab") as out:
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env, cwd=cwd)
        agent = Agent(root=root, proc=proc, port=0, log_path=log_path, notify=notify, started=started)
        self.started.append(agent)
        if expect_ready:
            try:
                agent.port = self.await_ready(agent)
            except BaseException:
                agent.kill()
                raise
        return agent

    def await_ready(self, agent: Agent) -> int:
        """The agent's port, once its READY=1 arrives (NotReady if it fails first)."""
        message = agent.notify.wait_ready(agent.log)
        agent.ready_seconds = time.perf_counter() - agent.started
        return listening_port(message)

    def cleanup(self) -> None:
        for agent in self.started:
            agent.kill()
            agent.notify.close()
