"""The VM dials its owner (issue 12): bind latency both ways, and a reconnection storm.

1. Latency, side by side in one run, interleaved: for each of --binds rounds, one agent that
   listens and is bound by the owner dialling it (`Owner.bind`: connect, TLS, exchange, status
   on the same connection), and one agent with no inbound port that dials `imprint serve`
   (its STATUS= "connected to the owner" is sent once the listener checked the status on the
   bind's connection). Both are timed from the agent's READY=1 to the bind verified, shared mode.
2. Storm: --storm bound agents (real processes, all at once) connected to `imprint serve`; the
   listener is killed (-9) and started again; timed from the restart's READY=1 until the listener
   reports every VM connected again, with the listener's CPU (user + system) over that time and
   its peak RSS (VmHWM). The agents spread their first retry over IMPRINT_AGENT_RECONNECT_SECONDS
   (--window; the production default is 10 s), so the time is mostly that window, by design.

    .venv/bin/python benchmarks/bench_dial_out.py                 # 20 binds each way, a 300-agent storm
    .venv/bin/python benchmarks/bench_dial_out.py --binds 10 --storm 100

Prints a table and one final JSON line; exits 0 whatever the result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _harness as h
from imprint.owner import Owner, viaserve
from imprint.owner.home import OwnerHome

from tests.helpers.owner import Owner as OwnerCli
from tests.helpers.serve import Serve
from tests.sshkit import free_port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dialling_root(factory: h.AgentFactory, token: str, name: str, owner_address: str) -> Path:
    root = factory.make_root(token, name)
    cmdline = root / "proc" / "cmdline"
    cmdline.write_text(cmdline.read_text().strip() + f" imprint.owner={owner_address}\n")
    return root


def latency(base: Path, binds: int, env: dict[str, str]) -> dict[str, list[float]]:
    owner = Owner(base / "home")
    owner.init()
    serve = Serve(OwnerCli(owner.home.dir), free_port(), base / "serve.log").start()
    factory = h.AgentFactory(base / "agents", env=env, ready_timeout=h.READY_TIMEOUT)
    factory.base.mkdir()
    out: dict[str, list[float]] = {"dial-in": [], "dial-out": []}
    try:
        for n in range(binds):
            agent = factory.start(factory.make_root(owner.new_token(f"in{n}", "shared"), f"in{n}"))
            ready = time.perf_counter()
            owner.bind(f"in{n}", agent.address)
            out["dial-in"].append(time.perf_counter() - ready)
            agent.kill()
            root = dialling_root(factory, owner.new_token(f"out{n}", "shared"), f"out{n}", serve.address)
            agent = factory.start(root, "--listen", "none")
            ready = time.perf_counter()
            if f"out{n}" not in (viaserve.await_connected(owner.home.dir, [f"out{n}"], h.READY_TIMEOUT) or []):
                raise RuntimeError(f"out{n} did not dial in")
            out["dial-out"].append(time.perf_counter() - ready)
            agent.kill()
    finally:
        serve.kill()
        factory.cleanup()
        owner.close()
    return out


def storm(base: Path, agents: int, env: dict[str, str]) -> dict[str, float]:
    cli = OwnerCli.create(base / "storm-home")
    home = OwnerHome(cli.home)
    store = home.store()
    serve = Serve(cli, free_port(), base / "storm-serve.log").start()
    factory = h.AgentFactory(base / "storm-agents", env=env, ready_timeout=600.0)
    factory.base.mkdir()
    try:
        for n in range(agents):  # all at once: none is waited for before the next starts
            factory.start(dialling_root(factory, h.issue_token(home, store, f"vm{n:03d}", "shared"), f"vm{n:03d}",
                                        serve.address), "--listen", "none", expect_ready=False)
        names = [f"vm{n:03d}" for n in range(agents)]
        if viaserve.await_connected(cli.home, names, 600.0) != names:
            raise RuntimeError("the agents did not all bind and connect within 600 s")
        serve.kill()
        serve.start()
        assert serve.proc is not None
        pid, restarted = serve.proc.pid, time.perf_counter()
        cpu_before = cpu_seconds(pid)
        # The listener wakes the wait at each connection: the time is its own, not a poll's.
        if viaserve.await_connected(cli.home, names, 600.0) != names:
            raise RuntimeError("the agents did not all reconnect within 600 s")
        seconds = time.perf_counter() - restarted
        cpu = cpu_seconds(pid) - cpu_before
        memory = h.proc_memory(pid)
        return {"agents": agents, "all_connected_s": seconds, "listener_cpu_s": cpu,
                "listener_peak_rss_mib": memory["VmHWM"] / 1024, "listener_rss_mib": memory["VmRSS"] / 1024}
    finally:
        serve.kill()
        factory.cleanup()
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binds", type=int, default=20)
    parser.add_argument("--storm", type=int, default=300)
    parser.add_argument("--window", type=float, default=10.0, help="the agents' first retry window (s)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="imprint-bench-dial-"))
    env = h.agent_env(bytecode_cache=base / "pycache")
    env.update(IMPRINT_AGENT_RECONNECT_SECONDS=str(args.window), IMPRINT_AGENT_RECONNECT_CAP_SECONDS="60")
    try:
        times = latency(base / "latency", args.binds, env) if args.binds else {"dial-in": [], "dial-out": []}
        result: dict[str, object] = {}
        for way, values in times.items():
            if values:
                ms = [v * 1000 for v in values]
                result[way] = {"median_ms": round(statistics.median(ms), 1), "min_ms": round(min(ms), 1),
                               "max_ms": round(max(ms), 1), "n": len(ms)}
                print(f"{way:9} bind from READY: median {statistics.median(ms):7.1f} ms  "
                      f"min {min(ms):7.1f}  max {max(ms):7.1f}  (n={len(ms)})")
        if args.storm:
            figures = storm(base / "storm", args.storm, env)
            result["storm"] = {k: round(v, 2) for k, v in figures.items()}
            print(f"storm: {args.storm} agents all connected {figures['all_connected_s']:.1f} s after the restart "
                  f"(first-retry window {args.window:g} s); listener CPU {figures['listener_cpu_s']:.2f} s, "
                  f"peak RSS {figures['listener_peak_rss_mib']:.1f} MiB")
        print(json.dumps(result))
    finally:
        h.end_work_dir(base, keep=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
