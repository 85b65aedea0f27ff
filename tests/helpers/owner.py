"""The owner side as tests drive it: the real `imprint` CLI on an owner home of its own, and the
in-process token issue the benchmarks use to keep the CLI's start-up out of their figures."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imprint.owner.home import OwnerHome
from imprint.owner.store import Store
from imprint.tokens import Mode

CLI_TIMEOUT = 120.0


@dataclass
class Owner:
    """`imprint --home HOME ...`; :meth:`create` also runs `imprint init` on a new home."""

    home: Path

    @classmethod
    def create(cls, home: Path) -> Owner:
        owner = cls(home)
        owner.run("init")
        return owner

    def run(self, *args: str, check: int | None = 0,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the CLI (in ``env``, default this process's); with ``check``, assert it exited
        with that code."""
        result = subprocess.run(
            [sys.executable, "-m", "imprint.owner", "--home", str(self.home), *args],
            capture_output=True, text=True, timeout=CLI_TIMEOUT, env=env,
        )
        if check is not None:
            assert result.returncode == check, (
                f"imprint {' '.join(args)} exited {result.returncode}, expected {check}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def token(self, name: str, mode: str) -> str:
        return self.run("token", "new", name, "--mode", mode).stdout.strip().splitlines()[-1]

    def json(self, *args: str, check: int | None = 0) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.run(*args, "--json", check=check).stdout)
        return data


def issue_token(home: OwnerHome, store: Store, vm: str, mode: str) -> str:
    """What `imprint token new VM --mode MODE` does, in-process (``mode`` as the CLI takes it)."""
    token = home.new_token(Mode(mode))
    text = token.encode()
    store.issue_token(vm, Mode(mode), token.token_id.hex(), text)
    return text
