"""constraints.txt: well formed, covers every dependency, and its check catches a drifted install."""

from __future__ import annotations

import importlib.util
import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
spec = importlib.util.spec_from_file_location("lock_tool", ROOT / "tools" / "lock.py")
lock_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock_tool)


def test_lock_pins_every_direct_dependency_exactly():
    pins = lock_tool.read_lock(LOCK)
    lines = [ln for ln in LOCK.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9\-]+==[A-Za-z0-9.+\-]+", ln) for ln in lines), "name==version lines only"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = project["dependencies"] + [d for deps in project["optional-dependencies"].values() for d in deps]
    names = {lock_tool.canonical(re.match(r"[A-Za-z0-9_.\-]+", d).group(0)) for d in direct}
    assert names - set(pins) == set(), "run `make lock` after changing pyproject.toml"
    assert "torch" in pins and "pip" in pins and lock_tool.PROJECT not in pins


def test_check_reports_a_version_that_differs_from_the_lock(tmp_path):
    try:
        metadata.version(lock_tool.PROJECT)
    except metadata.PackageNotFoundError:
        pytest.skip("the project is not installed (make install does that)")
    needed = lock_tool.required_closure(["dev"])
    assert {"torch", "numpy", "pytest"} <= needed
    pins = {k: metadata.version(k) for k in needed}
    good = tmp_path / "good.lock"
    good.write_text("".join(f"{k}=={v}\n" for k, v in pins.items()))
    assert lock_tool.check(good, ["dev"]) == []
    bad = tmp_path / "bad.lock"
    bad.write_text("".join(f"{k}=={'0.0.1' if k == 'numpy' else v}\n" for k, v in pins.items() if k != "h5py"))
    problems = lock_tool.check(bad, ["dev"])
    assert any(p.startswith("numpy: installed") and "locked 0.0.1" in p for p in problems)
    assert any(p.startswith("h5py ") and "not in bad.lock" in p for p in problems)


def test_pylock_has_the_same_versions_as_constraints_txt_with_hashes():
    # pylock.toml (PEP 751, `pip lock`) is the standard-format copy of the lock, with artifact URLs and sha256s;
    # `make lock` writes both from one resolution, so they must never disagree.
    tomllib = pytest.importorskip("tomllib")
    packages = tomllib.loads((ROOT / "pylock.toml").read_text())["packages"]
    pylock = {lock_tool.canonical(p["name"]): p["version"] for p in packages if "version" in p}
    pins = {k: v for k, v in lock_tool.read_lock(LOCK).items() if k != "pip"}  # pip is not a project dependency
    assert pylock == pins, "run `make lock`"
    assert all(w["hashes"]["sha256"] for p in packages for w in p.get("wheels", []))


def test_requirements_txt_is_the_default_install_pinned_from_the_lock():
    # requirements.txt: the closure `make install` builds (extras dev,cluster,cpu) at constraints.txt's versions,
    # for tools that read a flat lock; `make lock` rewrites it, and it must never drift from constraints.txt.
    try:
        metadata.version(lock_tool.PROJECT)
    except metadata.PackageNotFoundError:
        pytest.skip("the project is not installed (make install does that)")
    lines = [ln for ln in (ROOT / "requirements.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines == lock_tool.requirements_lines(LOCK, ["dev", "cluster", "cpu"]), "run `make lock`"
    pins = lock_tool.read_lock(LOCK)
    assert all(pins[lock_tool.canonical(ln.split("==")[0])] == ln.split("==")[1] for ln in lines)
    assert {"torch", "faiss-cpu", "ray", "pytest-xdist"} <= {ln.split("==")[0] for ln in lines}


def test_pylock_names_pypi_files_never_this_machines_mirror(tmp_path):
    # pip lock records file:// URLs for wheels a local mirror serves; `make lock` rewrites them to the same files'
    # PyPI addresses (storage path = BLAKE2b-256 of the file), so the lock installs on any machine.
    assert "file://" not in (ROOT / "pylock.toml").read_text(), "run tools/lock.py --portable-pylock pylock.toml"
    wheel = tmp_path / "mirror" / "demo-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"not really a wheel")
    lock = tmp_path / "pylock.toml"
    keep = 'url = "https://files.pythonhosted.org/packages/aa/bb/cc/other-1.0-py3-none-any.whl"'
    lock.write_text(f'[[packages.wheels]]\nurl = "file://{wheel}"\n\n[[packages.wheels]]\n{keep}\n')
    assert lock_tool.portable_pylock(lock) == 1
    digest = __import__("hashlib").blake2b(b"not really a wheel", digest_size=32).hexdigest()
    text = lock.read_text()
    assert f'url = "https://files.pythonhosted.org/packages/{digest[:2]}/{digest[2:4]}/{digest[4:]}/{wheel.name}"' in text
    assert keep in text and "file://" not in text
