"""Start-up benchmark: `clipdistill --help` and every `clipdistill CMD --help`, against a bare Python start.

Each is a fresh process (what a user or a sweep subprocess pays); the median of ``--repeats`` runs is kept,
since the machine is shared. Target: every median <= 1 s on the 2-core machine.

    .venv/bin/python bench/bench_startup.py [--repeats 7] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(args: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(args, cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--smoke", action="store_true", help="one run each of three commands (the tests run it)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from stages.cli import app

    commands = sorted(c.name for c in app.registered_commands)
    if args.smoke:
        args.repeats, commands = 1, commands[:2]
    base = median_seconds([sys.executable, "-c", "pass"], args.repeats)
    rows = [("(bare python)", base)]
    cli = [sys.executable, "-m", "stages.cli"]
    rows.append(("clipdistill --help", median_seconds(cli + ["--help"], args.repeats)))
    rows += [(f"clipdistill {c} --help", median_seconds(cli + [c, "--help"], args.repeats)) for c in commands]
    for name, sec in rows:
        print(f"{name:<36} {sec:6.2f} s  x{sec / base:5.1f} bare python")
    worst = max(sec for _, sec in rows[1:])
    print(f"slowest --help: {worst:.2f} s, ratio to bare python x{worst / base:.1f}; "
          f"target <= 1 s: {'met' if worst <= 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
