"""The one way files are published: write to ``<name>.<pid>.tmp`` in the same folder, then rename over the target.

A kill or crash mid-write leaves the previous file (or none) plus a stray ``.tmp`` that the next write
removes, never a half-written file under the real name that a reader would accept. The temporary name
carries the writer's pid so two processes publishing the same file at once (two feature jobs sharing a
cache both write its summary) never rename each other's half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from pipeline.common.errors import PipelineError


def tmp_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_tmps(path: str | Path) -> None:
    """Delete temporaries of ``path`` left by writers that are gone (killed mid-write)."""
    path = Path(path)
    for stray in path.parent.glob(f"{glob.escape(path.name)}.*tmp"):
        middle = stray.name[len(path.name):-len("tmp")].strip(".")
        if middle == "" or (middle.isdigit() and not _pid_alive(int(middle))):
            stray.unlink(missing_ok=True)


CHECKSUM_SUFFIX = ".blake2b"


def file_checksum(path: str | Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = False, checksum: bool = False) -> Iterator[Path]:
    """Yields the temporary path to write; renames it to ``path`` when the block succeeds.

    ``fsync``: flush the data to disk before the rename publishes it (large files others will read).
    ``checksum``: also record the file's BLAKE2b in ``<path>.blake2b`` (checkpoints, exports), which
    ``verify_file`` compares. A full disk ends in a one-line error, with the previous file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmps(path)
    tmp = tmp_path(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        digest = file_checksum(tmp) if checksum else None
        if digest is not None:  # the old sidecar goes first: a kill between the two leaves none, not a wrong one
            checksum_path(path).unlink(missing_ok=True)
        os.replace(tmp, path)
        if digest is not None:
            write_text(checksum_path(path), digest + "\n")
    except BaseException as exc:
        # Writers report a full disk in their own ways (torch's zip writer: a RuntimeError about positions),
        # so the disk itself is asked, before the partial file is removed and frees the space again.
        full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or (
            isinstance(exc, (OSError, RuntimeError)) and _disk_full(path.parent))
        tmp.unlink(missing_ok=True)
        if full:
            raise PipelineError(f"no space left on the device writing {path}; the previous version is "
                                "untouched. Free space and rerun (finished work is kept)") from None
        raise


def _disk_full(folder: Path, margin: int = 1 << 20) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < margin


NO_CHECKSUM = "no checksum recorded"
TRUST_ENV = "CLIPDISTILL_TRUST_UNCHECKED"  # an environment variable, so spawned runs and loader workers inherit it


def trust_unchecked() -> bool:
    """Whether files that should carry a checksum but carry none are used anyway (``--trust-unchecked``)."""
    return os.environ.get(TRUST_ENV, "") not in ("", "0")


def set_trust_unchecked(on: bool) -> None:
    if on:
        os.environ[TRUST_ENV] = "1"


def unchecked_error(what: str, path: str | Path) -> PipelineError:
    """The one refusal of a file without its checksum (written before checksums, or the checksum was deleted)."""
    return PipelineError(f"refusing {what} {path}: no checksum recorded (written before checksums, or its checksum "
                         "was removed); rewrite it, or pass --trust-unchecked to use it unchecked")


def verify_file(path: str | Path, what: str | None = None) -> str | None:
    """None when ``path`` matches its recorded checksum; else what is wrong (missing, no checksum, differs).

    With ``what`` (the kind of file, for the message) a problem is raised as a one-line PipelineError instead:
    the rule every loader of a file this project wrote follows. A missing checksum passes only when trusted.
    """
    path = Path(path)
    if not path.is_file():
        problem = "missing"
    else:
        try:
            recorded = checksum_path(path).read_text().strip()
        except OSError:
            recorded = None
        if recorded is None:
            problem = NO_CHECKSUM
        elif file_checksum(path) != recorded:
            problem = "content differs from its checksum (changed or damaged)"
        else:
            problem = None
    if what is None or problem is None:
        return problem
    if problem == NO_CHECKSUM:
        if trust_unchecked():
            return None
        raise unchecked_error(what, path)
    if problem == "missing":
        raise PipelineError(f"{what} not found: {path}")
    raise PipelineError(f"damaged {what} {path}: {problem}; rewrite it (delete it and rerun what made it)")


@contextlib.contextmanager
def exclusive(path: str | Path) -> Iterator[bool]:
    """Claim ``<path>.lock`` for this process while the block runs; yields False when a live process holds it.

    A lock left by a process that no longer runs (killed) is taken over.
    """
    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _holder_alive(lock):
                yield False
                return
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)
        return
    yield False


def _holder_alive(lock: Path) -> bool:
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return True  # being written this instant: treat as held
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def human_bytes(n: float) -> str:
    """A size for people: 512 B, 3.2 MiB, ..."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, default=str))
