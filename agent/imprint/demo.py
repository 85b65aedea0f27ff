"""Local end-to-end demo: a real imprint-agent on a temporary root binds to a fresh owner, in
both modes, and each step prints what it proved. Run: python -m imprint.demo"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _owner(home: Path, *args: str, expect: int = 0) -> str:
    result = subprocess.run([sys.executable, "-m", "imprint.owner", "--home", str(home), *args],
                            capture_output=True, text=True, timeout=120)
    shown = (result.stdout + result.stderr).rstrip()
    print("\n".join(f"   $ imprint {' '.join(args)}".split("\n") + [f"     {line}" for line in shown.splitlines()]))
    if result.returncode != expect:
        raise SystemExit(f"demo: `imprint {' '.join(args)}` exited {result.returncode}, expected {expect}")
    return result.stdout


class _Agent:
    def __init__(self, root: Path, work: Path, listen: str = "127.0.0.1:0") -> None:
        self.root = root
        notify_path = work / f"notify-{os.getpid()}-{id(self)}"
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(notify_path))
        self._notify.settimeout(60)
        self.log_path = work / f"{root.name}.log"
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), PYTHONUNBUFFERED="1")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imprint.guest", "run", "--root", str(root), "--listen", listen],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:
            message = self._notify.recv(4096).decode()
            if "STATUS=failed" in message:
                raise SystemExit(f"demo: agent failed: {message}")
            if "READY=1" in message:
                match = re.search(r":(\d+) ", message)
                assert match is not None
                self.address = f"127.0.0.1:{match.group(1)}"
                break
        notify_path.unlink()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._notify.close()


def _run_mode(mode: str, home: Path, work: Path) -> None:
    name = f"web-{mode}"
    _say(f"{mode} mode: the owner makes a token for {name} and hands it to the site")
    token = _owner(home, "token", "new", name, "--mode", mode).strip().splitlines()[-1]
    root = work / name
    (root / "proc").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "proc" / "cmdline").write_text(f"console=ttyS0 root=LABEL=root imprint.token={token}\n")
    print(f"   the site boots the VM with imprint.token=... on its kernel command line ({root}/proc/cmdline)")

    agent = _Agent(root, work)
    try:
        print(f"   imprint-agent read the token, made its key and listens on {agent.address}")
        bind_args = ["bind", name, "--address", agent.address]
        if mode == "nosecret":
            from imprint import tokens
            from imprint.site import reverse

            # What the site does: only the agent's whole announcement line counts (imprint-site reverse).
            answers = tokens.parse(token).token_id.hex()
            vm_token = reverse.extract(root / "dev" / "console", answers=answers)
            line = tokens.vm_token_line(vm_token, tokens.parse(token))
            print(f"   the VM printed on its console, and the site relays it to the owner:\n     {line}")
            bind_args += ["--vm-token", vm_token.encode()]
        _say(f"{mode} mode: the owner binds; the exchange runs inside TLS 1.3 bound to the VM's certificate")
        _owner(home, *bind_args)
        print("   what the agent proved and recorded:")
        for line in agent.log_path.read_text().splitlines():
            if "bound to owner" in line:
                print(f"     {line}")
        _say(f"{mode} mode: the agent is killed and restarts; the pin survives, no token needed")
        agent.stop()
        agent = _Agent(root, work, listen=agent.address)
        _owner(home, "status", name)
        _say(f"{mode} mode: another owner cannot bind the bound VM: it accepts only its pinned owner")
        other = work / f"other-{mode}"
        _owner(other, "init")
        _owner(other, "token", "new", name, "--mode", mode)
        extra = bind_args[4:]
        _owner(other, "bind", name, "--address", agent.address, *extra, expect=3)
    finally:
        agent.stop()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="imprint-demo-") as tmp:
        work = Path(tmp)
        home = work / "owner"
        _say("the owner creates its identity once")
        _owner(home, "init")
        for mode in ("shared", "nosecret"):
            _run_mode(mode, home, work)
        _say("the owner's record")
        _owner(home, "list")
        _owner(home, "audit")
    print("\ndemo: both modes bound, pinned, survived a restart, and refused a second bind.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
