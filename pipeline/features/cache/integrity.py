"""Content checksums of cache shards: recorded while writing, verified when a shard is new to this place.

Each shard stores ``checksum:<dataset>`` attributes: BLAKE2b-128 over the dataset's dtype, shape and bytes,
computed from the arrays as they are written. A shard is verified in full (every dataset read back and hashed)
the first time it is opened where it lies - after writing, or after a copy - and when asked (``--verify``);
a successful full check leaves ``<shard>.verified`` recording the file's size, mtime and inode, so later opens
of the unchanged file only compare those (cheap). Any change of the file (a copy, an edit, a truncation)
invalidates the stamp and brings the full check back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from pipeline.common import io

CHECKSUM_PREFIX = "checksum:"
LEGACY = "no checksums recorded (written before caches had them); rebuild it to have it checked"
STAMP_SUFFIX = ".verified"


def array_checksum(array: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    arr = np.ascontiguousarray(array)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(memoryview(arr).cast("B") if arr.size else b"")
    return h.hexdigest()


def checksum_attrs(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {CHECKSUM_PREFIX + name: array_checksum(a) for name, a in arrays.items()}


def shard_problems(path: Path) -> list[str]:
    """What is wrong with a shard's content (empty when every dataset matches its recorded checksum)."""
    try:
        with h5py.File(path, "r") as f:
            recorded = {k[len(CHECKSUM_PREFIX):]: str(v) for k, v in f.attrs.items() if k.startswith(CHECKSUM_PREFIX)}
            if not recorded:
                return [LEGACY]
            problems = [f"dataset {name!r} is missing" for name in recorded if name not in f]
            problems += [f"dataset {name!r} has no recorded checksum" for name in f if name not in recorded]
            for name in recorded:
                if name in f and array_checksum(f[name][()]) != recorded[name]:
                    problems.append(f"{name} differs from its checksum (the file was changed or damaged)")
            return problems
    except (OSError, ValueError, KeyError) as exc:  # truncated or not HDF5
        return [f"unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"]


def _identity(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "device": st.st_dev}


def stamp_path(path: Path) -> Path:
    return path.with_name(path.name + STAMP_SUFFIX)


def is_stamped(path: Path) -> bool:
    """Verified in full since it was last written or copied here (its identity still matches the stamp)."""
    try:
        return json.loads(stamp_path(path).read_text()) == _identity(path)
    except (OSError, ValueError):
        return False


def stamp(path: Path) -> None:
    """Record that ``path`` passed a full check; a read-only folder simply gets no stamp."""
    try:
        io.write_text(stamp_path(path), json.dumps(_identity(path)))
    except OSError:
        pass


def verify_shard(path: Path, force: bool = False) -> list[str]:
    """Full check of ``path`` unless it is stamped (or ``force``); stamps it when it passes."""
    if not force and is_stamped(path):
        return []
    problems = shard_problems(path)
    if not problems:
        stamp(path)
    return problems


__all__ = ["array_checksum", "checksum_attrs", "shard_problems", "verify_shard", "is_stamped", "stamp",
           "CHECKSUM_PREFIX", "STAMP_SUFFIX"]
