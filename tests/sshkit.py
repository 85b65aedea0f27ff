"""Real OpenSSH for the ssh backend tests: a guest root with a user database, Debian's `sshd`
serving that root, and OpenSSH's `ssh` as the client.

sshd runs in a private mount namespace (``unshare --mount``) in which the root's etc/passwd,
group, shadow, gshadow, etc/ssh and home are bind-mounted on their real paths: sshd sees the
root's users, host keys, sshd_config.d/imprint.conf and home directories at the guest paths the
backend wrote into its files, with StrictModes on, as in a VM. A bind-mounted file stays the
inode it was at mount time, so sshd starts after the backend created its users (as sshd would
read the new files in a VM). Needs root, which CI has.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
needs_root_and_sshd = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(SSHD).exists() or shutil.which("unshare") is None
    or shutil.which("useradd") is None or shutil.which("ssh") is None,
    reason="needs root (useradd --root, mount namespaces), Debian's openssh-server and openssh-client",
)
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                                reason="needs root for useradd --root and file ownership")

SSHD_CONFIG = """\
# The image's sshd_config, as Debian 12 ships it in the parts that matter here.
Include /etc/ssh/sshd_config.d/*.conf
Port {port}
ListenAddress 127.0.0.1
PidFile none
UsePAM no
StrictModes yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile .ssh/authorized_keys
LogLevel VERBOSE
"""


def seed_root(root: Path) -> Path:
    """A guest root with the minimal user database Debian has before anyone is added: root, the
    sshd privilege-separation user and nobody (copied from this machine, so the ids agree)."""
    etc = root / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    users, groups = ("root", "sshd", "nobody"), ("root", "nogroup")
    for name, wanted, mode in (("passwd", users, 0o644), ("group", groups, 0o644),
                               ("shadow", users, 0o640), ("gshadow", groups, 0o640)):
        lines = [line for line in Path("/etc", name).read_text().splitlines() if line.split(":")[0] in wanted]
        (etc / name).write_text("\n".join(lines) + "\n")
        os.chmod(etc / name, mode)
    (etc / "ssh" / "sshd_config.d").mkdir(parents=True, exist_ok=True)
    (root / "home").mkdir(exist_ok=True)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def keygen(path: Path, comment: str = "test", kind: str = "ed25519") -> str:
    """A new key pair at ``path``; returns the public line."""
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)], check=True)
    return path.with_name(path.name + ".pub").read_text().strip()


@dataclass
class Sshd:
    root: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = field(default=0)

    def write_config(self) -> None:
        (self.root / "etc/ssh/sshd_config").write_text(SSHD_CONFIG.format(port=self.port))

    def start(self) -> Sshd:
        if not (self.root / "etc/ssh/sshd_config").exists():
            self.write_config()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        mounts = " ".join(f"mount --bind {self.root}/etc/{f} /etc/{f};" for f in ("passwd", "group", "shadow",
                                                                                     "gshadow", "ssh"))
        script = f"{mounts} mount --bind {self.root}/home /home; exec {SSHD} -D -e -f /etc/ssh/sshd_config"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec", script],
                                         stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        self.wait_listening(self.starts)
        return self

    def wait_listening(self, times: int, timeout: float = 15.0) -> None:
        """Until the log says "Server listening" ``times`` times (sshd re-execs on SIGHUP)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count("Server listening on 127.0.0.1") >= times:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"sshd exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise AssertionError(f"sshd not listening after {timeout} s:\n{self.log()}")

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        self.starts += 1
        self.wait_listening(self.starts)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # unshare execs sh, which execs sshd: one process throughout


@dataclass
class SshdFactory:
    base: Path
    started: list[Sshd] = field(default_factory=list)

    def make(self, root: Path, port: int | None = None) -> Sshd:
        sshd = Sshd(root=root, port=port or free_port(), log_path=self.base / f"sshd-{len(self.started)}.log")
        self.started.append(sshd)
        return sshd

    def cleanup(self) -> None:
        for sshd in self.started:
            with contextlib.suppress(Exception):
                sshd.stop()


def ssh(port: int, known_hosts: Path, identity: Path, user: str, *command: str,
        extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """OpenSSH's client with StrictHostKeyChecking=yes and only ``known_hosts`` to trust."""
    argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "UpdateHostKeys=no", "-o", "IdentitiesOnly=yes", "-i", str(identity),
            "-o", "ConnectTimeout=10", "-p", str(port), "-l", user, *extra, "127.0.0.1", *command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
