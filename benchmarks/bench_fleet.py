"""Fleet throughput: VMs bound by ``Owner.bind_many`` on this machine, against --parallel.

For each --parallel value, --vms agents (real `imprint-agent` processes on loopback, each with
its own token) are bound in waves of --wave (agents take memory; their start-up is not timed):
a wave's agents are started and ready, then one ``bind_many`` binds them all (timed), then they
are stopped. Reported per --parallel: binds/s over the summed binding time, and the owner's CPU
per bind (user + system of this process, every bind thread included, over the bind_many calls;
the agents' CPU is theirs and not counted). Goal (issue 11): 1,000 VMs in <= 10 s of binding
(>= 100 binds/s) and <= 3 ms of owner CPU per bind.

    .venv/bin/python benchmarks/bench_fleet.py                      # 1,000 VMs x 1, 4, 16, 64
    .venv/bin/python benchmarks/bench_fleet.py --vms 300 --rounds 3     # medians of 3 rounds, interleaved

Prints a table, PASS/MISS per goal and one final JSON line; exits 0 whatever the result.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _harness as h
from imprint.owner import FleetRequest, Owner


def owner_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bind_fleet(base: Path, vms: int, parallel: int, wave: int, mode: str) -> dict[str, float]:
    home = base / f"home-p{parallel}"
    owner = Owner(home)
    owner.init()
    env = h.agent_env(bytecode_cache=base.parent / "pycache")  # shared by every round
    factory = h.AgentFactory(base / f"agents-p{parallel}", env=env, ready_timeout=h.READY_TIMEOUT)
    factory.base.mkdir(parents=True)
    binding, cpu, bound = 0.0, 0.0, 0
    try:
        for first in range(0, vms, wave):
            names = [f"vm{n}" for n in range(first, min(vms, first + wave))]
            agents = {n: factory.start(factory.make_root(owner.new_token(n, mode), n), expect_ready=False)
                      for n in names}
            for agent in agents.values():
                agent.port = factory.await_ready(agent)
            requests = [FleetRequest(n, a.address, a.vm_token() if mode == "nosecret" else None)
                        for n, a in agents.items()]
            cpu_before, started = owner_cpu(), time.perf_counter()
            summary = owner.bind_many(requests, parallel=parallel)
            binding += time.perf_counter() - started
            cpu += owner_cpu() - cpu_before
            bound += summary.count("bound")
            if summary.count("bound") != len(requests):
                failed = [r for r in summary.results if r.outcome != "bound"]
                print(f"  {len(failed)} not bound, e.g. {failed[0].name}: {failed[0].error}", file=sys.stderr)
            for agent in agents.values():
                agent.kill()
                agent.notify.close()
            factory.started.clear()
    finally:
        factory.cleanup()
        owner.close()
    return {"vms": vms, "bound": bound, "parallel": parallel, "binding_seconds": binding,
            "binds_per_second": bound / binding if binding else 0.0,
            "owner_cpu_ms_per_bind": 1000 * cpu / bound if bound else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--wave", type=int, default=100, help="agents alive at once (memory)")
    parser.add_argument("--mode", choices=["shared", "nosecret"], default="shared")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every --parallel value; medians reported")
    parser.add_argument("--tmpdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="imprint-bench-fleet-", dir=args.tmpdir))
    runs: dict[int, list[dict[str, float]]] = {parallel: [] for parallel in args.parallel}
    try:
        # Rounds interleave the --parallel values, so that a noisy minute of this shared machine
        # falls on all of them; each row is the median of its rounds.
        for round_number in range(args.rounds):
            for parallel in args.parallel:
                result = bind_fleet(base / f"round{round_number}", args.vms, parallel, args.wave, args.mode)
                runs[parallel].append(result)
                print(f"round {round_number + 1} parallel {parallel}: {result['binds_per_second']:.1f} binds/s, "
                      f"{result['owner_cpu_ms_per_bind']:.2f} ms CPU/bind", file=sys.stderr)
    finally:
        h.end_work_dir(base, keep=args.keep)
    results = [{"parallel": parallel, "vms": args.vms, "rounds": len(done),
                "bound": min(r["bound"] for r in done),
                "binding_seconds": statistics.median(r["binding_seconds"] for r in done),
                "binds_per_second": statistics.median(r["binds_per_second"] for r in done),
                "owner_cpu_ms_per_bind": statistics.median(r["owner_cpu_ms_per_bind"] for r in done),
                "each": done} for parallel, done in runs.items()]
    rows = [[str(r["parallel"]), f"{r['bound']}/{args.vms}", f"{r['binding_seconds']:.2f} s",
             f"{r['binds_per_second']:.1f}", f"{r['owner_cpu_ms_per_bind']:.2f} ms",
             " ".join(f"{e['binds_per_second']:.0f}/{e['owner_cpu_ms_per_bind']:.1f}" for e in r["each"])]
            for r in results]
    h.print_table(["parallel", "bound", "binding time", "binds/s", "owner CPU/bind", "each round (binds/s / ms)"],
                  rows)
    for r in results:
        fast, cheap = r["binds_per_second"] >= 100, r["owner_cpu_ms_per_bind"] <= 3
        print(f"parallel {r['parallel']}: {r['binds_per_second']:.1f} binds/s (goal >= 100) "
              f"{h.verdict(fast)}, owner CPU {r['owner_cpu_ms_per_bind']:.2f} ms per bind (goal <= 3) "
              f"{h.verdict(cheap)}")
    print(json.dumps({"benchmark": "fleet", "mode": args.mode, "machine": h.machine(), "commit": h.commit(),
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
