"""Write or check constraints.txt: the exact version of every package `make install` puts in .venv.

The lock is a pip constraints file (``name==version`` lines), made from pip's own resolver
(``pip install --dry-run --ignore-installed --report``) over the project and all its extras, so:
  * `make install` = ``pip install -c constraints.txt -e '.[dev]'`` installs exactly what CI tested, on any
    day; pins for packages an install does not need (the ``gpu`` extra's, another platform's) are ignored;
  * the version ranges in pyproject.toml stay as they are for people installing into their own environment.
pip rather than pip-tools or uv: it is the installer `make install` runs anyway, it honours this machine's pip
configuration (local wheel indexes, the torch cap), and it needs nothing else installed.

    python tools/lock.py [--out constraints.txt] [--extras dev,gpu,deploy,cluster,cpu]  # `make lock`: resolve anew
    python tools/lock.py --keep constraints.txt [--out constraints.txt]  # add new packages, move no pin
    python tools/lock.py --check [--out constraints.txt]                # installed == locked?
    python tools/lock.py --portable-pylock pylock.toml                  # local mirror URLs -> PyPI's

``--keep OLD`` passes the old lock to the resolver as constraints (``pip ... -c OLD``), so every package that was
pinned keeps its version and only packages new to the lock (a new dependency or extra and what it pulls in) get a
pin; the resolution fails, instead of moving a pin, when a new package needs another version of a pinned one.
Pins of packages no longer needed drop out. Use it when adding a dependency (`make lock KEEP=constraints.txt`;
plain `make lock` re-resolves from scratch and may upgrade everything, torch included).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "clipdistill"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version.strip()
    return pins


def resolve(extras: str, keep: Path | None = None) -> dict[str, str]:
    """Every distribution pip would install for the project with ``extras``, ignoring what is installed
    (with ``keep``: constrained to that lock's versions)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
               "--report", str(report), f"{ROOT}[{extras}]"]
        if keep is not None:
            # a copy: --out may be the same file, and pip reads the constraints while we write nothing yet
            kept = Path(tmp) / "keep.txt"
            kept.write_text(keep.read_text())
            cmd += ["-c", str(kept)]
        subprocess.run(cmd, check=True)
        items = json.loads(report.read_text())["install"]
    pins = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
    pins.pop(PROJECT, None)
    pins["pip"] = metadata.version("pip")  # `make install` upgrades pip first, to this version
    return pins


def write_lock(out: Path, extras: str, keep: Path | None = None) -> None:
    pins = resolve(extras, keep)
    if keep is not None:
        old = read_lock(keep)
        moved = {n: (old[n], v) for n, v in pins.items() if n in old and old[n] != v and n != "pip"}
        if moved:  # pip is the installer's own version, not a resolved one
            sys.exit(f"--keep {keep}: pins would move: {moved}")
        added = sorted(set(pins) - set(old))
        print(f"kept {len(set(pins) & set(old))} pins, added {len(added)}: {' '.join(added) or '-'}")
    header = [
        "# constraints.txt: exact versions `make install` installs (pip constraints file).",
        "# Regenerate with `make lock` (tools/lock.py); do not edit by hand.",
        f"# Resolved {time.strftime('%Y-%m-%d')} for extras [{extras}] on CPython {platform.python_version()} "
        f"{sys.platform}-{platform.machine()}.",
    ]
    out.write_text("\n".join(header + [f"{n}=={v}" for n, v in sorted(pins.items())]) + "\n")
    print(f"{out}: {len(pins)} packages pinned")


def required_closure(extras: list[str]) -> set[str]:
    """Installed distributions the project needs (its requirements with ``extras``, transitively)."""
    seen, todo = set(), [(PROJECT, set(extras))]
    while todo:
        name, wanted = todo.pop()
        key = canonical(name)
        if key in seen and not wanted:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in requires:
            m = re.match(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?[^;]*(;(.*))?", req)
            dep, marker = m.group(1), (m.group(4) or "").strip()
            if marker:
                extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
                if extra and extra.group(1) not in wanted:
                    continue
                if not extra and not _marker_holds(marker):
                    continue
            sub = {e.strip() for e in (m.group(2) or "[]")[1:-1].split(",") if e.strip()}
            if canonical(dep) not in seen or sub:
                todo.append((dep, sub))
    seen.discard(PROJECT)
    return seen


def _marker_holds(marker: str) -> bool:
    try:
        from packaging.markers import Marker
    except ImportError:  # packaging is a pytest dependency, so it is there wherever the check runs
        return True
    try:
        return Marker(marker).evaluate({"extra": ""})
    except Exception:
        return True


def check(lock: Path, extras: list[str]) -> list[str]:
    """Problems: packages the project needs that are installed at another version than locked, or unlocked."""
    pins = read_lock(lock)
    problems = []
    for key in sorted(required_closure(extras)):
        try:
            installed = metadata.version(key)
        except metadata.PackageNotFoundError:
            problems.append(f"{key}: required but not installed")
            continue
        if key not in pins:
            problems.append(f"{key} {installed}: not in {lock.name} (run `make lock`)")
        elif pins[key] != installed:
            problems.append(f"{key}: installed {installed}, locked {pins[key]}")
    return problems


def requirements_lines(lock: Path, extras: list[str]) -> list[str]:
    """The exact environment `make install` builds with ``extras`` (the project's closure, pinned from ``lock``):
    what ``requirements.txt`` holds, for ``pip install -r requirements.txt`` then ``pip install --no-deps -e .``."""
    pins = read_lock(lock)
    return [f"{key}=={pins[key]}" for key in sorted(required_closure(extras)) if key in pins]


def write_requirements(out: Path, lock: Path, extras: list[str]) -> None:
    header = [f"# requirements.txt: the packages `make install` (extras [{','.join(extras)}]) installs, at the versions",
              f"# of {lock.name}, the ones CI tests. Written by `make lock` (tools/lock.py --requirements); do not edit.",
              "#   pip install -r requirements.txt && pip install --no-deps -e ."]
    lines = requirements_lines(lock, extras)
    out.write_text("\n".join(header + lines) + "\n")
    print(f"{out}: {len(lines)} packages")


PYPI_FILES = "https://files.pythonhosted.org/packages"
FILE_URL = re.compile(r'^url = "file://(/[^"]+)"$', re.M)


def pypi_url(wheel: Path) -> str:
    """PyPI's address of a file it serves: its storage path is the file's BLAKE2b-256 digest split 2/2/rest."""
    digest = hashlib.blake2b(wheel.read_bytes(), digest_size=32).hexdigest()
    return f"{PYPI_FILES}/{digest[:2]}/{digest[2:4]}/{digest[4:]}/{wheel.name}"


def portable_pylock(path: Path) -> int:
    """Rewrite the ``file://`` URLs pip lock records for wheels this machine's pip configuration serves from a
    local mirror into the same files' PyPI URLs (the lock's sha256 still pins each file), so the lock installs
    anywhere; returns how many were rewritten."""
    text = path.read_text()
    rewritten = FILE_URL.sub(lambda m: f'url = "{pypi_url(Path(m.group(1)))}"', text)
    path.write_text(rewritten)
    return len(FILE_URL.findall(text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "constraints.txt")
    ap.add_argument("--extras", default="dev,gpu,deploy,cluster,cpu", help="extras resolved into the lock")
    ap.add_argument("--keep", type=Path, metavar="OLD_LOCK",
                    help="resolve with OLD_LOCK's pins as constraints: only new packages get new pins")
    ap.add_argument("--check", action="store_true", help="compare the installed packages with the lock")
    ap.add_argument("--check-extras", default="dev", help="extras whose packages --check compares")
    ap.add_argument("--requirements", type=Path, metavar="OUT",
                    help="write OUT: the installed closure of --check-extras pinned from --out (requirements.txt)")
    ap.add_argument("--portable-pylock", type=Path, metavar="PYLOCK",
                    help="rewrite PYLOCK's local-mirror file:// wheel URLs into PyPI's URLs of the same files")
    args = ap.parse_args()
    if args.portable_pylock:
        print(f"{args.portable_pylock}: {portable_pylock(args.portable_pylock)} local wheel URLs made PyPI's")
        return
    if args.requirements:
        write_requirements(args.requirements, args.out, [e for e in args.check_extras.split(",") if e])
        return
    if args.check:
        problems = check(args.out, [e for e in args.check_extras.split(",") if e])
        for p in problems:
            print(f"lock mismatch: {p}", file=sys.stderr)
        if problems:
            sys.exit(1)
        print(f"installed packages match {args.out.name}")
        return
    write_lock(args.out, args.extras, args.keep)


if __name__ == "__main__":
    main()
