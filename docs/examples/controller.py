"""A controller that binds VMs for its owner: tokens for N VMs, handed to a site with each
VM's boot, and each VM bound as its VM token comes back through the site.

    python docs/examples/controller.py --home /srv/imprint --vms 4

The site here is a stand-in that runs on one machine (LoopbackSite): each "VM" is an
imprint-agent on a directory tree (its kernel command line a file, its console a file), and the
VM token is read back from the console as a real site does (`imprint-site reverse`). A real
controller replaces LoopbackSite with its cloud's API: put the token on a boot channel
(`imprint-site seed`), read the console or the metadata the VM writes back.

No-secrets mode: the tokens are not secret (the site may see them); what the site must not do
is alter them, and imprint detects it if it does (the bind fails, nothing is pinned).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from imprint import tokens
from imprint.owner import Owner, OwnerError
from imprint.site import reverse


class LoopbackSite:
    """Boots "VMs" as local agents; yields (name, agent address, VM token) as each is up."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.vms: dict[str, tuple[subprocess.Popen[bytes], socket.socket, Path]] = {}

    def boot(self, name: str, token: str) -> None:
        root = self.work / name
        (root / "proc").mkdir(parents=True)
        (root / "dev").mkdir()
        (root / "proc" / "cmdline").write_text(f"console=ttyS0 ro imprint.token={token}\n")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # the agent reports READY as to systemd
        notify_path = str(self.work / f".{name}.notify")
        notify.bind(notify_path)
        notify.settimeout(60)
        agent = subprocess.Popen([sys.executable, "-m", "imprint.guest", "run", "--root", str(root),
                                  "--listen", "127.0.0.1:0"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**os.environ, "NOTIFY_SOCKET": notify_path})
        self.vms[name] = (agent, notify, root)

    def booted(self) -> Iterator[tuple[str, str, str]]:
        for name, (_, notify, root) in self.vms.items():
            message = ""
            while "READY=1" not in message:
                message = notify.recv(4096).decode()
            address = message.split("listening on ", 1)[1].split()[0]
            owner_token_id = tokens.parse((root / "proc" / "cmdline").read_text().split("imprint.token=")[1].split()[0])
            yield name, address, self._vm_token(root / "dev" / "console", owner_token_id.token_id.hex())

    @staticmethod
    def _vm_token(console: Path, answers: str) -> str:
        deadline = time.monotonic() + 60
        while True:  # a site tails the console until the agent's announcement is there
            try:
                return reverse.extract(console, answers=answers).encode()
            except (reverse.ReverseError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def shut_down(self) -> None:
        for agent, notify, _ in self.vms.values():
            agent.terminate()
            agent.wait()
            notify.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="the owner home (made if new)")
    parser.add_argument("--vms", type=int, default=4)
    parser.add_argument("--work", type=Path, help="where the loopback site keeps its VMs (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="imprint-site-"))
    work.mkdir(parents=True, exist_ok=True)

    with Owner(args.home) as owner:
        owner.init()
        site = LoopbackSite(work)
        try:
            for n in range(1, args.vms + 1):
                site.boot(f"app{n}", owner.new_token(f"app{n}", "nosecret"))
            failures = 0
            with ThreadPoolExecutor(max_workers=8) as pool:
                futures = {name: pool.submit(owner.bind, name, address, vm_token)
                           for name, address, vm_token in site.booted()}  # each bound as it arrives
                for name, future in futures.items():
                    try:
                        print(f"{name}: bound, VM key {future.result().vm_fingerprint}")
                    except OwnerError as exc:  # one class per failure (exit codes of the CLI)
                        failures += 1
                        print(f"{name}: {type(exc).__name__}: {exc}")
        finally:
            site.shut_down()
        print(f"{args.vms - failures} bound, {failures} failed")
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
