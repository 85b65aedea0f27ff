"""An `imprint-agent run` process started the way a test needs it: with its output appended to a
console file shared with its announcements (as under systemd), or with code run before the
agent's main (a compromised agent). Readiness and cleanup are the AgentFactory's (conftest)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import READY_TIMEOUT, Agent, AgentFactory


def launch(agents: AgentFactory, root: Path, output: Path, *extra: str, prelude: str = "") -> Agent:
    """Start the agent on ``root`` with stdout and stderr appended to ``output`` (O_APPEND, so no
    writer overwrites another, as on a tty); ``prelude``: Python run in the agent process first."""
    sock_dir = tempfile.mkdtemp(prefix="imprint-notify-")  # short: AF_UNIX paths are limited
    sock_path = os.path.join(sock_dir, "n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    notify.settimeout(READY_TIMEOUT)
    agents.sockets.append(sock_path)
    env = dict(os.environ, NOTIFY_SOCKET=sock_path, PYTHONUNBUFFERED="1")
    main = f"{prelude}\nimport sys\nfrom imprint.guest.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    cmd = [sys.executable, "-c", main, "run", "--root", str(root), "--listen", "127.0.0.1:0",
           "--announce-interval", "3600", *extra]
    with output.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    agent = Agent(root=root, proc=proc, port=0, log_path=output, notify=notify)
    agents.started.append(agent)
    agent.port = agents.await_ready(agent)
    return agent
