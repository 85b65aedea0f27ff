"""`imprint serve` as tests run it: a real listener process on an owner home, ready when its
READY=1 arrives on a NOTIFY_SOCKET (no sleeps)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.agents import start_notifying
from tests.helpers.owner import Owner


@dataclass
class Serve:
    owner: Owner
    port: int
    log: Path
    host: str = "127.0.0.1"
    env: Mapping[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Serve:
        cmd = [sys.executable, "-m", "imprint.owner", "--home", str(self.owner.home), "serve", "--listen", self.address]
        self.proc, _, _ = start_notifying(cmd, self.log, self.env or os.environ)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
