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


def assert_refused_by_vm(home: Path, vm_pin: Path, port: int, timeout: float = 60.0) -> None:
    """The agent on ``port`` refuses the certificate of owner home ``home`` in the TLS handshake
    (TLS 1.3: the refusal of a client certificate arrives at the first read), though this side
    trusts the VM's pinned certificate ``vm_pin``."""
    import socket
    import ssl

    import pytest
    from imprint import tls

    context = tls.owner_pinned_context(str(home / "owner.crt"), str(home / "owner.key"),
                                       tls.PinnedCert.from_pem(vm_pin.read_text()))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout)) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"GET /v1/status HTTP/1.1\r\nConnection: close\r\n\r\n")
            if not sock.recv(1):
                raise ConnectionError("closed without a word")
