"""The npm packages the built-in datasets render (Iconify JSON icon sets, CLDR annotations), pinned.

``npm-lock.json`` (next to this module, written by ``make npm-lock``) names each package's version and the sha512
of its tarball (npm's ``dist.integrity``). A package is fetched as ``npm pack NAME@VERSION`` and its tarball is
checked against that hash before it is unpacked, so every machine renders the icons CI tested: a bare
``npm pack NAME`` would take whatever release is newest that day. A cached tarball or unpacked folder that does
not match the lock (damaged, or another version) is not used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.common import io
from pipeline.common.errors import PipelineError

LOCK_FILE = Path(__file__).with_name("npm-lock.json")
LOCK_FORMAT = "clipdistill-npm-lock/1"
STAMP = ".integrity"  # in an unpacked folder: the sha512 of the tarball it came from


@dataclass(frozen=True)
class PinnedPackage:
    name: str
    version: str
    integrity: str  # "sha512-<base64>", as npm's dist.integrity

    @property
    def slug(self) -> str:
        """How ``npm pack`` names the package's files: "@iconify-json/noto" -> "iconify-json-noto"."""
        return self.name.lstrip("@").replace("/", "-")


def read_lock(path: Optional[Path] = None) -> dict[str, PinnedPackage]:
    path = Path(path or LOCK_FILE)
    try:
        data = json.loads(path.read_text())
        if data.get("format") != LOCK_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {LOCK_FORMAT!r}")
        pins = {name: PinnedPackage(name, str(e["version"]), str(e["integrity"]))
                for name, e in data["packages"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PipelineError(f"cannot read the npm lock {path}: {exc}") from None
    bad = [n for n, p in pins.items() if not p.integrity.startswith("sha512-")]
    if bad:
        raise PipelineError(f"{path}: {bad} have no sha512 integrity; rewrite it with `make npm-lock`")
    return pins


def integrity_of(path: Path) -> str:
    """A file's hash in npm's ``dist.integrity`` form (subresource integrity: sha512, base64)."""
    return "sha512-" + base64.b64encode(io.hash_file(path, hashlib.sha512()).digest()).decode()


def fetch_package(package: str, cache_dir: Path, marker: str = "icons.json", lock: Optional[Path] = None) -> Path:
    """The unpacked ``package/`` folder of ``package`` at its pinned version (``npm pack`` into ``cache_dir`` once;
    reused while its tarball's hash still matches the lock)."""
    pins = read_lock(lock)
    pin = pins.get(package)
    if pin is None:
        raise PipelineError(f"npm package {package} is not pinned in {lock or LOCK_FILE}: add it with `make npm-lock`")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    unpacked = cache_dir / pin.slug
    stamp = unpacked / STAMP
    if (unpacked / "package" / marker).is_file() and stamp.is_file() and stamp.read_text().strip() == pin.integrity:
        return unpacked / "package"
    tarball = cache_dir / f"{pin.slug}-{pin.version}.tgz"
    if tarball.is_file() and integrity_of(tarball) != pin.integrity:
        if shutil.which("npm") is None:
            raise PipelineError(f"{tarball} does not match the sha512 pinned for {package}@{pin.version} "
                                "(damaged or another build): delete it, or install npm to fetch it again")
        tarball.unlink()
    if not tarball.is_file():
        _npm_pack(pin, cache_dir)
    found = integrity_of(tarball)
    if found != pin.integrity:
        raise PipelineError(f"npm pack {package}@{pin.version} gave a tarball whose sha512 is not the pinned one "
                            f"({found[:20]}... vs {pin.integrity[:20]}...); refusing to use it")
    tmp = unpacked.with_name(unpacked.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tarball) as tf:
        tf.extractall(tmp, filter="data")
    (tmp / STAMP).write_text(pin.integrity + "\n")
    shutil.rmtree(unpacked, ignore_errors=True)
    tmp.replace(unpacked)
    return unpacked / "package"


def _npm_pack(pin: PinnedPackage, cache_dir: Path) -> None:
    spec = f"{pin.name}@{pin.version}"
    if shutil.which("npm") is None:
        raise PipelineError(f"npm is needed to fetch {spec} (or put {pin.slug}-{pin.version}.tgz in {cache_dir})")
    proc = subprocess.run(["npm", "pack", spec, "--pack-destination", str(cache_dir), "--silent"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not (cache_dir / f"{pin.slug}-{pin.version}.tgz").is_file():
        detail = (proc.stderr.strip().splitlines() or ["no tarball written"])[-1]
        raise PipelineError(f"npm pack {spec} failed: {detail}")
