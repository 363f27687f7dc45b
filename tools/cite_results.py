"""Print a RESULTS table's rows and paired differences from docs/results/summary.json (`make demo` cites Table D).

    python tools/cite_results.py TABLE_ID [--summary docs/results/summary.json]

The numbers are the ones `clipdistill experiments` wrote; nothing here computes a result. A table that is not in
the summary yet is said in one line (exit 0: the demo's own table above stands on its own).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _mean_std(s: dict) -> str:
    if not s.get("n"):
        return "-"
    vals = ", ".join(f"{v:.1f}" for v in s["values"])
    return f"{s['mean']:.1f} ± {s['std']:.1f} ({vals})" if s["n"] > 1 else f"{s['mean']:.1f}"


def cite(summary: dict, table_id: str) -> list[str]:
    for name, entry in summary.get("sweeps", {}).items():
        if table_id in entry.get("tables", {}):
            break
    else:
        return [f"Table {table_id!r} is not in the summary yet (clipdistill experiments writes it)."]
    rows = entry["tables"][table_id]
    out = [f"The same comparison over seeds, test RSUM (docs/RESULTS.md, sweep {entry['sweep']}):"]
    teacher = entry.get("teacher")
    if teacher:
        out.append(f"  teacher {teacher['name']}: {teacher['metrics']['rsum']:.1f}")
    out += [f"  {label}: {_mean_std(row['rsum'])}" for label, row in rows.items()]
    for d in entry.get("paired_differences", {}).get(table_id, []):
        per_seed = " / ".join(f"{v:+.1f}" for v in d["values"])
        out.append(f"  {d['name']}: {d['mean']:+.1f} ± {d['std']:.1f} per seed ({per_seed}): {d['verdict']}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table_id")
    parser.add_argument("--summary", type=Path, default=Path("docs/results/summary.json"))
    args = parser.parse_args(argv)
    try:
        summary = json.loads(args.summary.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.summary}: {exc}", file=sys.stderr)
        return 2
    print("\n".join(cite(summary, args.table_id)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
