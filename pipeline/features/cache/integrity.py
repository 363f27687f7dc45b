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
from dataclasses import dataclass
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


def dataset_checksum(dset: h5py.Dataset, rows_per_read: int | None = None) -> str:
    """``array_checksum`` of a stored dataset, read a block of rows at a time (a token cache can be larger than
    RAM): the same bytes in the same order, so the same digest."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{np.dtype(dset.dtype).str}{tuple(dset.shape)}".encode())
    if dset.size == 0:
        return h.hexdigest()
    if not dset.shape:
        h.update(memoryview(np.ascontiguousarray(dset[()])).cast("B"))
        return h.hexdigest()
    row_bytes = max(1, dset.size // dset.shape[0] * dset.dtype.itemsize)
    step = rows_per_read or max(1, (64 << 20) // row_bytes)
    for lo in range(0, dset.shape[0], step):
        h.update(memoryview(np.ascontiguousarray(dset[lo:lo + step])).cast("B"))
    return h.hexdigest()


def dataset_names(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def file_problems(path: Path) -> list[str]:
    """What is wrong with an HDF5 file's content (a cache shard, a token split): empty when every dataset
    matches its recorded ``checksum:<name>`` attribute (datasets in groups named by their path)."""
    try:
        with h5py.File(path, "r") as f:
            recorded = {k[len(CHECKSUM_PREFIX):]: str(v) for k, v in f.attrs.items() if k.startswith(CHECKSUM_PREFIX)}
            if not recorded:
                return [LEGACY]
            present = dataset_names(f)
            problems = [f"dataset {name!r} is missing" for name in recorded if name not in present]
            problems += [f"dataset {name!r} has no recorded checksum" for name in present if name not in recorded]
            for name in recorded:
                if name in present and dataset_checksum(f[name]) != recorded[name]:
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
    problems = file_problems(path)
    if not problems:
        stamp(path)
    return problems


def check_file(path: Path, what: str, fix: str, force: bool = False) -> None:
    """The checksum rule for an HDF5 file this project wrote (``common.io.verify_file`` for the others): a damaged
    file is refused in one line, and so is one without checksums unless ``--trust-unchecked`` is on."""
    from pipeline.common.errors import PipelineError

    problems = verify_shard(path, force=force)
    if problems == [LEGACY]:
        if not io.trust_unchecked():
            raise io.unchecked_error(what, path)
    elif problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PipelineError(f"damaged {what} {path}: {problems[0]}{more}; {fix}")


@dataclass(frozen=True)
class Finding:
    status: str  # ok | damaged | missing | unchecked
    path: Path
    detail: str = ""

    @property
    def bad(self) -> bool:
        return self.status in ("damaged", "missing")


def _token_file(path: Path) -> bool | None:
    """True for a token cache file (split or class prompts) or classification soft targets, False for another HDF5
    file, None if unreadable."""
    from pipeline.features.cache.format import TARGETS_FORMAT, TOKEN_FORMAT

    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get("format", "")) in (TOKEN_FORMAT, TARGETS_FORMAT)
    except OSError:
        return None


SIDECAR_SUFFIXES = (".pt", ".onnx", ".index")  # checkpoints, exports, LiT heads, TorchScript; graphs; FAISS


def _sidecar_kind(path: Path) -> bool:
    """A file that should carry a ``.blake2b`` checksum beside it (LiT tower features included)."""
    return path.suffix in SIDECAR_SUFFIXES or path.name.endswith("-features.npz") or io.checksum_path(path).exists()


def verify_tree(path: Path) -> list[Finding]:
    """Check every stored file under ``path`` (or ``path`` itself): stage-1 shards (and the shards missing from
    their split), token cache and class-prompt files, and the files checked by a ``.blake2b`` beside them
    (checkpoints, student and classifier exports, LiT heads and tower features, TorchScript encoders, ONNX graphs,
    FAISS indexes). A file that should carry a checksum and has none is ``unchecked``. Negative-queue memmaps are
    working files (the checkpoint holds the queue's state) and are not listed. A file that passes a full check is
    stamped, as when a cache opens it."""
    from pipeline.common.errors import PipelineError
    from pipeline.features.cache.format import SHARD_RE, CacheMeta, shard_name

    path = Path(path)
    if not path.exists():
        raise PipelineError(f"nothing to verify at {path}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    shards = [p for p in files if SHARD_RE.match(p.name)]
    others = {p: _token_file(p) for p in files if p.suffix == ".h5" and not SHARD_RE.match(p.name)}
    tokens = [p for p, kind in others.items() if kind is not False]
    stored = [p for p in files if _sidecar_kind(p) and not p.name.endswith(io.CHECKSUM_SUFFIX)
              and not p.name.endswith(".tmp") and "queue" not in p.parts]
    orphans = [p for p in files if p.name.endswith(io.CHECKSUM_SUFFIX)
               and not p.with_name(p.name[:-len(io.CHECKSUM_SUFFIX)]).exists()]
    if not shards and not tokens and not stored and not orphans:
        raise PipelineError(f"{path} holds no cache shards, token caches or files with checksums (checkpoints, "
                            "exports, LiT heads, TorchScript, ONNX graphs, FAISS indexes)")
    found: list[Finding] = []
    for split_dir in sorted({p.parent for p in shards}):
        present = sorted(p for p in shards if p.parent == split_dir)
        try:
            with h5py.File(present[0], "r") as f:
                total = CacheMeta.from_attrs(f.attrs).total_shards
            found += [Finding("missing", split_dir / n, f"shard {n} of {total}")
                      for n in (shard_name(i, total) for i in range(total)) if not (split_dir / n).exists()]
        except (OSError, KeyError, TypeError):
            pass  # the unreadable shard is reported below
        found += [_check_h5(p) for p in present]
    found += [_check_h5(p) for p in tokens]
    for file in stored:
        problem = io.verify_file(file)
        if problem == io.NO_CHECKSUM:
            found.append(Finding("unchecked", file, "no checksum recorded (written before checksums, or removed)"))
        else:
            found.append(Finding("damaged", file, problem) if problem else Finding("ok", file))
    found += [Finding("missing", p.with_name(p.name[:-len(io.CHECKSUM_SUFFIX)]), f"only its checksum {p.name} is here")
              for p in orphans]
    return found


def _check_h5(path: Path) -> Finding:
    problems = file_problems(path)
    if problems == [LEGACY]:
        return Finding("unchecked", path, LEGACY)
    if problems:
        return Finding("damaged", path, "; ".join(problems))
    stamp(path)
    return Finding("ok", path)


__all__ = ["Finding", "verify_tree", "array_checksum", "checksum_attrs", "dataset_checksum", "file_problems", "verify_shard", "is_stamped", "stamp",
           "CHECKSUM_PREFIX", "STAMP_SUFFIX"]
