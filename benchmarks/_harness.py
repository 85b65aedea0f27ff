"""Shared pieces of the benchmarks: /proc memory readings, the agents' environment, and small
statistics and table helpers. Agents are started by the tests' own harness (tests/helpers/agents.py:
`python -m imprint.guest run` with a NOTIFY_SOCKET this process listens on; "READY=1", with the
port, arrives there; no sleeps).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

READY_TIMEOUT = 60.0
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python benchmarks/bench_x.py`: the harness is tests.helpers

# Re-exported: the benchmarks reach the harness as h.NAME.
from tests.helpers.agentroot import make_root as make_root  # noqa: E402
from tests.helpers.agents import AGENT_MODULE  # noqa: E402
from tests.helpers.agents import Agent as Agent  # noqa: E402
from tests.helpers.agents import AgentFactory as AgentFactory  # noqa: E402
from tests.helpers.agents import start_notifying as start_notifying  # noqa: E402
from tests.helpers.owner import issue_token as issue_token  # noqa: E402


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


def start_agent(root: Path, log_dir: Path, env: Mapping[str, str], *extra: str,
                python_flags: Sequence[str] = (), launcher: Sequence[str] = AGENT_MODULE) -> Agent:
    """An agent on a free loopback port, returned once it sent READY=1 (the benchmarks' longer
    READY timeout: a loaded machine). ``ready_seconds`` runs from just before Popen to READY=1:
    fork and exec, interpreter start-up, imports, key generation (first boot), listen, the
    notification. ``launcher`` replaces ``-m imprint.guest`` (e.g. ``-c CODE`` that patches first)."""
    factory = AgentFactory(root.parent, env=env, ready_timeout=READY_TIMEOUT)
    return factory.start(root, *extra, log=log_dir / f"{root.name}-{time.monotonic_ns()}.log",
                         python_flags=python_flags, launcher=launcher)


def end_work_dir(base: Path, *, keep: bool) -> None:
    """A run's temporary directory: removed, or with ``keep`` left and named on stderr."""
    if keep:
        print(f"kept {base}", file=sys.stderr)
    else:
        shutil.rmtree(base, ignore_errors=True)


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
