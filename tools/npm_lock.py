"""Pin the npm packages the built-in datasets render: write pipeline/data/datasets/npm-lock.json.

Each package the code names (corpus styles, CLDR annotations, line-icon sets) gets a version and npm's sha512 of
its tarball (``npm view NAME@VERSION version dist.integrity``). A package already pinned keeps its version unless
``--upgrade`` (then: the newest release); a new one is pinned at the newest. ``--check`` (offline) only verifies
that the lock names exactly the packages the code uses.

    python tools/npm_lock.py [--upgrade | --check]      (make npm-lock [UPGRADE=1])
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.datasets.corpus import ANNOTATIONS, STYLES  # noqa: E402
from pipeline.data.datasets.icons import ICON_SETS  # noqa: E402
from pipeline.data.datasets.npm import LOCK_FILE, LOCK_FORMAT, read_lock  # noqa: E402


def used_packages() -> list[str]:
    return sorted({*STYLES.values(), *ANNOTATIONS, *ICON_SETS.values()})


def resolve(spec: str) -> dict:
    proc = subprocess.run(["npm", "view", spec, "version", "dist.integrity", "--json"],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        sys.exit(f"npm view {spec} failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    data = json.loads(proc.stdout)
    return {"version": data["version"], "integrity": data["dist.integrity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=LOCK_FILE)
    parser.add_argument("--upgrade", action="store_true", help="move every package to its newest release")
    parser.add_argument("--check", action="store_true", help="offline: the lock names exactly the used packages")
    args = parser.parse_args()
    old = read_lock(args.out) if args.out.is_file() else {}
    if args.check:
        missing, extra = set(used_packages()) - set(old), set(old) - set(used_packages())
        if missing or extra:
            sys.exit(f"{args.out}: not pinned {sorted(missing)}, pinned but unused {sorted(extra)}; run make npm-lock")
        print(f"{args.out}: {len(old)} npm packages pinned")
        return
    packages = {}
    for name in used_packages():
        spec = f"{name}@{old[name].version}" if name in old and not args.upgrade else f"{name}@latest"
        packages[name] = resolve(spec)
        print(f"  {name}@{packages[name]['version']}")
    args.out.write_text(json.dumps({"format": LOCK_FORMAT, "packages": packages}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
