"""`imprint status` as a whole process against `ssh host true` to a local sshd: what an owner
runs today to check a VM, side by side in one run (issue 11).

One real agent on a seeded guest root, bound with an `[ssh]` profile (a user with a key; the
host keys the agent attested go to the owner's known_hosts), and Debian's sshd serving that
root (tests/sshkit.py: a private mount namespace, so root is needed). Then, alternating, --runs
times each: `imprint --home H status web1` (interpreter start, imports, pinned mutual TLS 1.3,
one GET, the fingerprint check) and `ssh -o StrictHostKeyChecking=yes ... alice@127.0.0.1 true`
(the attested host key, public-key authentication, a session, `true`).

    .venv/bin/python benchmarks/bench_status.py [--runs 15]

Prints a table and one final JSON line; exits 0 whatever the result (2 without root or sshd).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _harness as h
from imprint.owner import Owner

from tests.sshkit import SSHD, SshdFactory, keygen, seed_root


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({result.returncode}): {result.stderr.strip()[:400]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not Path(SSHD).exists() or shutil.which("unshare") is None:
        print("bench_status: needs root, Debian's openssh-server and unshare (sshd serves a guest root)",
              file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="imprint-bench-status-"))
    factory = h.AgentFactory(base, env=h.agent_env(bytecode_cache=base / "pycache"))
    sshds = SshdFactory(base)
    try:
        owner = Owner(base / "home")
        owner.init()
        root = seed_root(factory.make_root(owner.new_token("web1", "shared"), "web1"))
        agent = factory.start(root)
        sshd = sshds.make(root)
        (base / "keys").mkdir()
        public = keygen(base / "keys" / "alice", "alice")
        owner.bind("web1", agent.address, profile={"ssh": {"users": [{"name": "alice", "authorized_keys": [public]}]}},
                   options={"ssh_host": "127.0.0.1", "ssh_port": sshd.port})
        sshd.start()
        status = [sys.executable, "-m", "imprint.owner", "--home", str(owner.home.dir), "status", "web1"]
        ssh = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
               "-o", f"UserKnownHostsFile={owner.home.dir / 'known_hosts' / 'web1'}",
               "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
               "-i", str(base / "keys" / "alice"), "-p", str(sshd.port), "alice@127.0.0.1", "true"]
        timed(status), timed(ssh)  # warm: bytecode, page cache
        runs: dict[str, list[float]] = {"imprint status": [], "ssh host true": []}
        for _ in range(args.runs):
            runs["imprint status"].append(timed(status))
            runs["ssh host true"].append(timed(ssh))
    finally:
        sshds.cleanup()
        factory.cleanup()
        h.end_work_dir(base, keep=args.keep)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    h.print_table(["command", "median", "min", "max"],
                  [[name, f"{1000 * medians[name]:.1f} ms", f"{1000 * min(v):.1f} ms", f"{1000 * max(v):.1f} ms"]
                   for name, v in runs.items()])
    ratio = medians["imprint status"] / medians["ssh host true"]
    print(f"imprint status / ssh host true: {ratio:.2f}x")
    print(json.dumps({"benchmark": "status", "machine": h.machine(), "commit": h.commit(), "runs": args.runs,
                      "median_seconds": medians, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
