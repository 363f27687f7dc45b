"""Locks on storage shared between machines: host + pid + a renewed lease; exactly one winner of a stale lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.common import io

ROOT = Path(__file__).resolve().parents[1]


def _plant(lock: Path, host: str, renewed: float, lease: float = 30.0, pid: int = 4242) -> None:
    lock.write_text(io.LockHolder(pid, host, renewed, lease, "feedface").line())


def test_a_lock_records_host_pid_and_a_lease_the_holder_renews(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPDISTILL_LOCK_LEASE_S", "0.3")
    with io.exclusive(tmp_path / "shard") as mine:
        assert mine
        first = io.read_lock(tmp_path / "shard.lock")
        assert (first.pid, first.host, first.lease) == (os.getpid(), io._host(), 0.3)
        deadline = time.time() + 5
        while io.read_lock(tmp_path / "shard.lock").renewed == first.renewed and time.time() < deadline:
            time.sleep(0.05)
        assert io.read_lock(tmp_path / "shard.lock").renewed > first.renewed  # renewed while held
    assert not (tmp_path / "shard.lock").exists()


def test_another_hosts_lock_is_respected_while_its_lease_runs_and_taken_over_after(tmp_path):
    lock = tmp_path / "shard.lock"
    _plant(lock, "other-host", time.time())  # pid 4242 may not exist here: it is not ours to ask about
    with io.exclusive(tmp_path / "shard") as mine:
        assert not mine
    assert io.lock_holder(tmp_path / "shard") == "4242 on other-host"
    _plant(lock, "other-host", time.time() - 31)  # its holder stopped renewing 31 s ago, lease 30 s
    with io.exclusive(tmp_path / "shard") as mine:
        assert mine and io.read_lock(lock).pid == os.getpid()


def test_a_killed_holder_not_yet_reaped_by_its_parent_is_dead(tmp_path):
    # a killed process stays a zombie (its pid still answers signals) until its parent waits for it: Ray's raylet
    # reaps a killed worker moments after the driver has already handed its shard to another worker
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant(tmp_path / "shard.lock", io._host(), time.time(), pid=child.pid)
        with io.exclusive(tmp_path / "shard") as mine:
            assert not mine  # alive: its lock is respected
        child.kill()
        deadline = time.time() + 10
        while not io._zombie(child.pid) and time.time() < deadline:
            time.sleep(0.02)
        os.kill(child.pid, 0)  # not reaped: the pid is still there
        with io.exclusive(tmp_path / "shard") as mine:
            assert mine and io.read_lock(tmp_path / "shard.lock").pid == os.getpid()
    finally:
        child.kill()
        child.wait()
    assert not io._zombie(child.pid) and not io._zombie(os.getpid())


def test_a_live_writers_temporary_is_kept_a_dead_ones_removed(tmp_path):
    path = tmp_path / "shard.h5"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    here_dead = path.with_name(f"shard.h5.{io._host()}.{dead}.tmp")
    here_live = path.with_name(f"shard.h5.{io._host()}.{os.getppid()}.tmp")
    foreign = path.with_name(f"shard.h5.other-host.{os.getpid()}.tmp")  # a live writer on another machine
    foreign_old = path.with_name("shard.h5.other-host.7.tmp")
    for f in (here_dead, here_live, foreign, foreign_old):
        f.write_text("half-written")
    old = time.time() - io.FOREIGN_TMP_AGE_S - 60
    os.utime(foreign_old, (old, old))
    io.write_text(path, "done")
    assert not here_dead.exists() and not foreign_old.exists()
    assert here_live.exists() and foreign.exists()


RACE = """
import sys, time
sys.path.insert(0, {root!r})
from pipeline.common import io
start = float(sys.argv[2])
while time.time() < start:
    pass
with io.exclusive(sys.argv[1]) as mine:
    print("won" if mine else "lost", flush=True)
    if mine:
        time.sleep(0.3)  # hold it while the other one is still deciding
"""


def test_two_processes_taking_over_one_stale_lock_exactly_one_wins(tmp_path):
    code = RACE.format(root=str(ROOT))
    for round_ in range(12):
        target = tmp_path / f"shard{round_}"
        # a stale lock of each kind: a dead local pid (old one-number format) or an expired foreign lease
        lock = Path(str(target) + ".lock")
        if round_ % 2:
            lock.write_text("999999999")
        else:
            _plant(lock, "other-host", time.time() - 100)
        start = time.time() + 0.6
        procs = [subprocess.Popen([sys.executable, "-c", code, str(target), str(start)], stdout=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        results = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert results == ["lost", "won"], (round_, results)
        assert not lock.exists() and not list(tmp_path.glob("*.takeover-*"))


def test_an_empty_lock_is_held_for_one_lease_then_taken_over(tmp_path, monkeypatch):
    """A creator killed between creating its lock and writing its line leaves an empty file: held while it may still
    be being written (one lease, by its age), stale after, never a lock that blocks for good."""
    monkeypatch.setenv("CLIPDISTILL_LOCK_LEASE_S", "30")
    lock = tmp_path / "shard.lock"
    lock.write_text("")
    with io.exclusive(tmp_path / "shard") as mine:
        assert not mine
    old = time.time() - 31
    os.utime(lock, (old, old))
    with io.exclusive(tmp_path / "shard") as mine:
        assert mine and io.read_lock(lock).pid == os.getpid()
    assert not lock.exists()


def test_writing_many_files_into_one_folder_lists_it_once_and_still_removes_dead_temporaries(tmp_path, monkeypatch):
    """Listing the folder before every write made N writes cost N^2; a dead writer's temporary is still removed."""
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    leftover = tmp_path / f"7.png.{io._host()}.{dead}.tmp"
    leftover.write_text("half-written")
    listings = []
    real_listdir = os.listdir
    monkeypatch.setattr(io.os, "listdir", lambda p: listings.append(p) or real_listdir(p))
    for i in range(50):
        io.write_bytes(tmp_path / f"{i}.png", b"x")
    assert len(listings) == 1 and not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}.png" for i in range(50))
