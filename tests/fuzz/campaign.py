"""A fuzzing campaign: every target (or the ones named) in turn, with a table of the figures.

``python -m tests.fuzz.campaign [-max_total_time=120] [NAME ...]``

Each target runs through tests.fuzz.run, one at a time (libFuzzer uses one core per run), from its
seed corpus in a fresh working corpus, so the figures are what the repository's seeds give in that
time. Crashes are written to tests/fuzz/crashes/<name>/ as in any run. Prints one Markdown row per
target: executions, seconds, coverage (libFuzzer's cov: edges and ft: features at the end),
corpus size, peak RSS, the crash files written (crash-, timeout-, oom-, leak-) and the slow units
(``slow-unit-``: one input that took over libFuzzer's -report_slow_units, 10 s by default; not a
failure, but worth a look in a parser that faces hostile bytes). ``--keep DIR`` keeps the grown corpora (to merge
the useful ones into the seeds with -merge=1).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.fuzz import run

ROOT = run.HERE.parent.parent
_STATS = re.compile(r"#(\d+)\s+(?:DONE|pulse|NEW|REDUCE|INITED)\s+cov: (\d+) ft: (\d+) corp: (\d+)/\S+.*?rss: (\d+)Mb")
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")


def campaign(names: list[str], flags: list[str], keep: Path | None) -> list[str]:
    rows = ["| target | executions | seconds | exec/s | cov | ft | corpus | rss MB | exit | crashes | slow units |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"imprint-campaign-{name}-") as scratch:
            work = (keep / name) if keep else Path(scratch)
            work.mkdir(parents=True, exist_ok=True)
            crashes = run.crashes_dir(name)
            before = set(crashes.iterdir()) if crashes.is_dir() else set()
            started = time.monotonic()
            result = subprocess.run([sys.executable, "-m", "tests.fuzz.run", name, *flags, str(work),
                                     str(run.corpus_dir(name))], cwd=ROOT, capture_output=True, text=True)
            elapsed = time.monotonic() - started
        stats = _STATS.findall(result.stderr)
        done = _DONE.search(result.stderr)
        execs, cov, ft, corpus, rss = stats[-1] if stats else ("?",) * 5
        if done:
            execs = done.group(1)
        after = set(crashes.iterdir()) if crashes.is_dir() else set()
        new = sorted(p.name for p in after - before if not p.name.startswith("slow-unit-"))
        slow = sorted(p.name for p in after - before if p.name.startswith("slow-unit-"))
        rate = f"{int(execs) / elapsed:.0f}" if execs.isdigit() and elapsed else "?"
        rows.append(f"| {name} | {execs} | {elapsed:.0f} | {rate} | {cov} | {ft} | {corpus} | {rss} | "
                    f"{result.returncode} | {len(new)}{': ' + ', '.join(new) if new else ''} | "
                    f"{len(slow)}{': ' + ', '.join(slow) if slow else ''} |")
        print(rows[-1], flush=True)
        if result.returncode != 0:
            print(result.stderr[-4000:], file=sys.stderr)
    return rows


def main(argv: list[str]) -> int:
    keep: Path | None = None
    if "--keep" in argv:
        index = argv.index("--keep")
        keep = Path(argv[index + 1]).resolve()
        del argv[index : index + 2]
    flags = [a for a in argv if a.startswith("-")] or ["-max_total_time=120"]
    names = [a for a in argv if not a.startswith("-")] or run.target_names()
    unknown = sorted(set(names) - set(run.target_names()))
    if unknown:
        print(f"unknown targets: {' '.join(unknown)}; targets: {' '.join(run.target_names())}", file=sys.stderr)
        return 2
    rows = campaign(names, flags, keep)
    print("\n".join(rows))
    columns = [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]
    return 0 if all(c[8] == "0" and c[9] == "0" for c in columns) else 1  # exit and crashes


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
