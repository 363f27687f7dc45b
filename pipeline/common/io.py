"""The one way files are published: write to ``<name>.<host>.<pid>.tmp`` in the same folder, then rename over the target.

A kill or crash mid-write leaves the previous file (or none) plus a stray ``.tmp`` that the next write
removes, never a half-written file under the real name that a reader would accept. The temporary name
carries the writer's host and pid so two processes publishing the same file at once (two feature jobs sharing a
cache both write its summary) never rename each other's half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.common.errors import PipelineError


def _host() -> str:
    """This machine's name as it goes into lock and temporary file names (dots kept, odd characters dropped)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "", socket.gethostname()) or "localhost"


def tmp_path(path: str | Path) -> Path:
    # host and pid: on storage shared between machines a pid alone names nobody (pids repeat across hosts)
    path = Path(path)
    return path.with_name(f"{path.name}.{_host()}.{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive unless a zombie
        pass
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A killed process its parent has not reaped yet (Linux; elsewhere never): dead, though its pid answers
    signals. Ray's raylet reaps a killed worker some moments after the driver hears of the death."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] in (["Z"], ["X"])


# A temporary written from another host is never judged by pid; it is removed only when nothing has touched it
# for this long (a live writer keeps writing to it: a shard's write takes seconds to minutes).
FOREIGN_TMP_AGE_S = 6 * 3600


# A folder's temporaries are listed at most every few seconds per process: listing before every write made writing
# N files into one folder cost N^2 (a 7,600-image corpus spent 25 s of its 59 s in listings). A writer that dies
# after a listing leaves a temporary that the next listing, or the next process, removes.
TMP_LISTING_TTL_S = 5.0
_tmp_listings: dict[str, tuple[float, set[str]]] = {}  # folder -> (when listed, names of its temporaries)


def _temporaries_in(folder: Path) -> set[str]:
    now, hit = time.monotonic(), _tmp_listings.get(str(folder))
    if hit is None or now - hit[0] > TMP_LISTING_TTL_S:
        try:
            names = {n for n in os.listdir(folder) if n.endswith("tmp")}
        except OSError:
            names = set()
        hit = _tmp_listings[str(folder)] = (now, names)
    return hit[1]


def remove_stale_tmps(path: str | Path) -> None:
    """Delete temporaries of ``path`` left by writers that are gone (killed mid-write); a live writer's never."""
    path = Path(path)
    listed = _temporaries_in(path.parent)
    for name in [n for n in listed if n.startswith(path.name + ".")]:
        stray = path.parent / name
        middle = stray.name[len(path.name):-len("tmp")].strip(".")
        host, _, pid = middle.rpartition(".")
        if middle == "":
            stale = True
        elif middle.isdigit():  # the older <name>.<pid>.tmp, written on this host
            stale = not _pid_alive(int(middle))
        elif pid.isdigit() and host == _host():
            stale = not _pid_alive(int(pid))
        elif pid.isdigit():
            try:
                stale = time.time() - stray.stat().st_mtime > FOREIGN_TMP_AGE_S
            except OSError:
                stale = False
        else:
            stale = False  # not a temporary of ours
        if stale:
            stray.unlink(missing_ok=True)
            listed.discard(name)


CHECKSUM_SUFFIX = ".blake2b"


def hash_file(path: str | Path, h):
    """``h`` (a hashlib object) updated with the file's bytes, read in blocks."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h


def file_checksum(path: str | Path) -> str:
    return hash_file(path, hashlib.blake2b(digest_size=16)).hexdigest()


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
        if digest is not None:
            # The sidecar first names both digests, so a kill between the two renames leaves a file that matches
            # it either way (a checkpoint a resume can trust); then only the new one.
            old = _recorded_digests(path)[:1]
            if old:
                write_text(checksum_path(path), "\n".join([digest, *old]) + "\n")
            else:
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


def _recorded_digests(path: Path) -> list[str]:
    """The digests ``<path>.blake2b`` accepts: one, or two while ``atomic_path`` is replacing the file."""
    try:
        return checksum_path(path).read_text().split()
    except OSError:
        return []


def verify_file(path: str | Path, what: str | None = None) -> str | None:
    """None when ``path`` matches its recorded checksum; else what is wrong (missing, no checksum, differs).

    With ``what`` (the kind of file, for the message) a problem is raised as a one-line PipelineError instead:
    the rule every loader of a file this project wrote follows. A missing checksum passes only when trusted.
    """
    path = Path(path)
    if not path.is_file():
        problem = "missing"
    else:
        recorded = _recorded_digests(path)
        if not recorded:
            problem = NO_CHECKSUM
        elif file_checksum(path) not in recorded:
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


# Locks: ``<path>.lock`` holds one line "pid host renewed_at lease_s nonce". The holder renews ``renewed_at``
# every lease/3 seconds from a thread while it works. A lock is stale when its holder is known dead: on this host
# its pid is gone; from another host (pids mean nothing here) its lease ran out. Clocks of the machines sharing
# the storage must agree to well within the lease (NTP does). CLIPDISTILL_LOCK_LEASE_S sets the lease.
DEFAULT_LEASE_S = 60.0


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    renewed: float  # time.time() of the last renewal
    lease: float
    nonce: str

    def line(self) -> str:
        return f"{self.pid} {self.host} {self.renewed:.3f} {self.lease:g} {self.nonce}\n"

    def __str__(self) -> str:
        return str(self.pid) if self.host == _host() else f"{self.pid} on {self.host}"


def lease_seconds() -> float:
    try:
        return max(0.05, float(os.environ.get("CLIPDISTILL_LOCK_LEASE_S", DEFAULT_LEASE_S)))
    except ValueError:
        return DEFAULT_LEASE_S


def read_lock(lock: str | Path) -> LockHolder | None:
    """The holder recorded in a lock file; None when it cannot be read (gone, or being written this instant).
    A bare pid (the older format) is a holder on this host."""
    try:
        parts = Path(lock).read_text(errors="replace").split()
        if not parts:  # created, not yet written: or its creator was killed in between. Its own age is its lease.
            mtime = Path(lock).stat().st_mtime
            return LockHolder(0, "", mtime, lease_seconds(), f"empty-{mtime:.6f}")
        if len(parts) == 1:
            return LockHolder(int(parts[0]), _host(), 0.0, float("inf"), "")
        pid, host, renewed, lease, nonce = parts[:5]
        return LockHolder(int(pid), host, float(renewed), float(lease), nonce)
    except (OSError, ValueError):
        return None


def lock_holder(path: str | Path) -> str:
    """Who holds ``<path>.lock``, for messages: "1234", or "1234 on otherhost"; "?" when unknown."""
    holder = read_lock(Path(str(path) + ".lock"))
    return str(holder) if holder else "?"


def _holder_alive(holder: LockHolder | None) -> bool:
    if holder is None:
        return True  # unreadable: being written this instant, treat as held
    if holder.host == _host() and holder.pid > 0:
        return _pid_alive(holder.pid)
    return time.time() - holder.renewed <= holder.lease


def _claim(lock: Path, mine: LockHolder) -> bool:
    """Create ``lock`` for ``mine``, taking over a stale one; True when this process now holds it.

    Creation is O_EXCL, so of several processes exactly one creates a missing lock. A stale lock is replaced
    only under a guard file named after the stale holder's nonce (also O_EXCL), after checking the lock still
    is that stale holder's: two processes taking over one stale lock cannot both win, and a fresh lock made
    meanwhile is never removed."""
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            stale = read_lock(lock)
            if _holder_alive(stale):
                return False
            guard = lock.with_name(f"{lock.name}.takeover-{stale.nonce or stale.pid}")
            try:
                gfd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                _drop_old_guard(guard, stale.lease)
                return False  # another process is taking this stale lock over right now
            os.close(gfd)
            try:
                if read_lock(lock) != stale:
                    continue  # it changed under us (released, or taken over): look again
                tmp = tmp_path(lock)  # a killed taker's leftover is removed like any stale temporary
                remove_stale_tmps(lock)
                tmp.write_text(mine.line())
                os.replace(tmp, lock)  # atomic: the lock never goes missing, so no O_EXCL creator slips in
                return True
            finally:
                guard.unlink(missing_ok=True)
        with os.fdopen(fd, "w") as fh:
            fh.write(mine.line())
        return True
    return False


def _drop_old_guard(guard: Path, lease: float) -> None:
    # a taker killed inside its few-millisecond window would leave the guard for good
    try:
        if time.time() - guard.stat().st_mtime > max(lease, 1.0) * 2:
            guard.unlink(missing_ok=True)
    except OSError:
        pass


def _renew(lock: Path, mine: LockHolder, stop: threading.Event) -> None:
    """Rewrite the lease while the holder works; stops (and never writes again) once the lock is not ours."""
    while not stop.wait(mine.lease / 3):
        held = read_lock(lock)  # once: a second read could see another state
        if held is None:
            continue  # unreadable this instant (shared storage hiccups): keep the lease alive, look again
        if held.nonce != mine.nonce:
            return  # taken over (we were judged dead): nothing of ours to renew
        fresh = LockHolder(mine.pid, mine.host, time.time(), mine.lease, mine.nonce)
        tmp = tmp_path(lock)
        try:
            tmp.write_text(fresh.line())
            os.replace(tmp, lock)
        except OSError:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive(path: str | Path) -> Iterator[bool]:
    """Claim ``<path>.lock`` for this process while the block runs; yields False when a live process holds it.

    A lock whose holder is gone is taken over: on this host when its pid no longer runs, from another host when
    its lease (renewed by this process while the block runs) has expired.
    """
    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    mine = LockHolder(os.getpid(), _host(), time.time(), lease_seconds(), secrets.token_hex(8))
    if not _claim(lock, mine):
        yield False
        return
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(lock, mine, stop), daemon=True, name="lock-lease")
    renewer.start()
    try:
        yield True
    finally:
        stop.set()
        renewer.join()
        held = read_lock(lock)
        if held is not None and held.nonce == mine.nonce:  # never remove a lock someone took over from us
            lock.unlink(missing_ok=True)


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
