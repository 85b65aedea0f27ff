"""Shared pieces of the benchmarks: real `imprint-agent` processes with systemd-style readiness,
/proc memory readings, and small statistics and table helpers.

Agents are started exactly like tests/conftest.py does: `python -m imprint.guest run` with a
NOTIFY_SOCKET this process listens on; "READY=1" (with the port) arrives there. No sleeps.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT = 60.0
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imprint.owner.home import OwnerHome  # noqa: E402
from imprint.owner.store import Store  # noqa: E402

from tests.agentroot import make_root  # noqa: E402, F401  (re-exported for the benchmarks)

AGENT_SOURCES = REPO / "agent"


def agent_env(*, bytecode_cache: Path | None) -> dict[str, str]:
    """Environment for agent processes.

    With ``bytecode_cache`` the agent's modules are compiled once into that directory
    (PYTHONPYCACHEPREFIX), as for an installed package whose .pyc files exist; without it,
    PYTHONDONTWRITEBYTECODE=1 makes every start compile imprint from source (the repository
    has no __pycache__ when the developer environment sets that variable).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPYCACHEPREFIX", None)
    if bytecode_cache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(bytecode_cache)
    return env


def issue_token(home: OwnerHome, store: Store, vm: str, mode: str) -> str:
    """What `imprint token new VM --mode MODE` does, in-process."""
    token = home.new_token(mode)
    text = token.encode()
    store.issue_token(vm, mode, token.token_id.hex(), text)
    return text


@dataclass
class Agent:
    root: Path
    proc: subprocess.Popen[bytes]
    port: int
    ready_seconds: float
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def vm_token(self) -> str:
        console = (self.root / "dev" / "console").read_text()
        found = re.findall(r"IMPRINT-VM-TOKEN (imprint1v-[a-z2-7]+)", console)
        if not found:
            raise RuntimeError(f"no VM token on the console; agent log:\n{self.log_path.read_text()}")
        return str(found[-1])

    def memory(self) -> dict[str, int]:
        return proc_memory(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=20)


def agent_command(root: Path, *extra: str, python_flags: Sequence[str] = (),
                  launcher: Sequence[str] = ("-m", "imprint.guest")) -> list[str]:
    return [sys.executable, *python_flags, *launcher, "run", "--root", str(root),
            "--listen", "127.0.0.1:0", "--announce-interval", "3600", *extra]


def start_agent(root: Path, log_dir: Path, env: Mapping[str, str], *extra: str,
                python_flags: Sequence[str] = (), launcher: Sequence[str] = ("-m", "imprint.guest")) -> Agent:
    """Start an agent on a free loopback port; return once it sent READY=1.

    ``ready_seconds`` runs from just before Popen to the arrival of READY=1: fork and exec,
    interpreter start-up, imports, key generation (first boot), listen, and the notification.
    ``launcher`` replaces ``-m imprint.guest`` (e.g. ``-c CODE`` that patches something first).
    """
    log_path = log_dir / f"{root.name}-{time.monotonic_ns()}.log"
    proc, ready, message = start_notifying(agent_command(root, *extra, python_flags=python_flags, launcher=launcher),
                                           log_path, env)
    match = re.search(r"listening on [^ ]+:(\d+)", message)
    if not match:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"READY without a port: {message!r}")
    return Agent(root=root, proc=proc, port=int(match.group(1)), ready_seconds=ready, log_path=log_path)


def start_notifying(cmd: Sequence[str], log_path: Path,
                    env: Mapping[str, str]) -> tuple[subprocess.Popen[bytes], float, str]:
    """Run ``cmd`` with a NOTIFY_SOCKET; return (process, seconds from Popen to READY=1, message)."""
    sock_dir = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp")
    sock_path = sock_dir / f"imprint-bench-notify-{os.getpid()}-{time.monotonic_ns()}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(READY_TIMEOUT)
    child_env = dict(env, NOTIFY_SOCKET=str(sock_path))
    try:
        with log_path.open("wb") as log:
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env)
        try:
            while True:
                try:
                    message = notify.recv(4096).decode()
                except TimeoutError:
                    raise RuntimeError(f"not ready in {READY_TIMEOUT} s:\n{log_path.read_text()}") from None
                if "READY=1" in message:
                    return proc, time.perf_counter() - started, message
                if "STATUS=failed" in message:
                    raise RuntimeError(f"agent failed: {message}\n{log_path.read_text()}")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    finally:
        notify.close()
        sock_path.unlink(missing_ok=True)


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile (kB, from /proc/PID/status) and Pss (from smaps_rollup)."""
    wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile"}
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[key] = int(value.split()[0])
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1])
    except OSError:
        pass
    return out


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, p90 (inclusive quantile), min, max and count."""
    ordered = sorted(values)
    p90 = statistics.quantiles(ordered, n=10, method="inclusive")[8] if len(ordered) > 1 else ordered[0]
    return {"n": len(ordered), "median": statistics.median(ordered), "p90": p90,
            "min": ordered[0], "max": ordered[-1]}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """First column left-aligned, the others right-aligned."""
    widths = [max(len(str(head)), *(len(str(r[i])) for r in rows)) for i, head in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def machine() -> dict[str, object]:
    """Enough about this machine to read the figures: CPUs, Python, OpenSSL, the temp file system."""
    import ssl
    import tempfile

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    fs = "unknown"
    tmp = Path(tempfile.gettempdir()).resolve()
    try:
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(tmp).startswith(parts[1]) and len(parts[1]) >= len(best):
                best, fs = parts[1], parts[2]
    except OSError:
        pass
    try:
        load = Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        load = "unknown"
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": sys.version.split()[0],
            "openssl": ssl.OPENSSL_VERSION, "tmpdir": str(tmp), "tmpdir_fs": fs, "loadavg_1min": load,
            "imprint_commit": commit()}


def commit() -> str:
    """The commit the agent code comes from, with "+dirty" when agent/ has local changes."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "agent"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")
