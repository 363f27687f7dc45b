"""experiments --jobs N on GPUs: each run gets a GPU of its own, round-robin over the visible ones; more runs at a
time than GPUs share them and the runner says so. No GPU needed: the visible GPUs are faked."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import torch

from pipeline.experiments import training


def test_the_pool_gives_the_least_used_gpu_and_takes_it_back():
    pool = training.GpuPool(["0", "1"])
    assert [pool.acquire() for _ in range(4)] == ["0", "1", "0", "1"]
    pool.release("1")
    assert pool.acquire() == "1"
    assert training.GpuPool([]).acquire() is None  # cpu: no GPU to hand out


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert training.visible_gpus(SimpleNamespace(device="auto")) == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert training.visible_gpus(SimpleNamespace(device="cuda")) == ["0", "1"]
    assert training.visible_gpus(SimpleNamespace(device="cuda:1")) == []  # pinned: every run there
    assert training.visible_gpus(SimpleNamespace(device="cpu")) == []


def test_jobs_at_once_run_on_different_gpus_and_sharing_is_said(tmp_path, monkeypatch):
    runs = {f"k{i}": SimpleNamespace(key=f"k{i}", name=f"run{i}", export=None, sets=[],
                                     cells=[SimpleNamespace(table="T", label="x", seed=i)]) for i in range(6)}
    plan = SimpleNamespace(runs=runs, base=SimpleNamespace(device="cuda"), run_dir=lambda key: tmp_path / key)
    monkeypatch.setattr(training, "visible_gpus", lambda config: ["0", "1"])
    monkeypatch.setattr(training, "_device_of", lambda config: "fake GPU")
    running, seen, lock = {}, [], threading.Lock()
    barrier = threading.Barrier(3)

    def fake_train_run(plan, run, device, gpu=None):
        with lock:
            running[run.key] = gpu
            if len(running) == 3:
                seen.append(sorted(running.values()))  # the three runs in flight together
        barrier.wait(timeout=10)  # the first three are in flight at once
        with lock:
            running.pop(run.key)
        return {"status": "trained", "train_seconds": 1.0}

    monkeypatch.setattr(training, "train_run", fake_train_run)
    monkeypatch.setattr(training, "is_trained", lambda run_dir: False)
    lines = []
    training.train_all(plan, jobs=3, log=lines.append)
    assert seen and seen[0] == ["0", "0", "1"]  # three at once over two GPUs: 2 + 1
    assert "note: 3 runs at a time share 2 GPU(s) (0, 1): up to 2 runs per GPU" in lines
    assert any(line.endswith("on GPU 0") for line in lines) and any(line.endswith("on GPU 1") for line in lines)


def test_jobs_on_the_cpu_without_a_thread_count_are_told_they_oversubscribe(tmp_path, monkeypatch):
    runs = {f"k{i}": SimpleNamespace(key=f"k{i}", name=f"run{i}", export=None, sets=[],
                                     cells=[SimpleNamespace(table="T", label="x", seed=i)]) for i in range(2)}
    monkeypatch.setattr(training, "visible_gpus", lambda config: [])
    monkeypatch.setattr(training, "_device_of", lambda config: "cpu")
    monkeypatch.setattr(training, "train_run", lambda plan, run, device, gpu=None: {"status": "trained"})
    monkeypatch.setattr(training, "is_trained", lambda run_dir: False)
    monkeypatch.setattr(training.os, "cpu_count", lambda: 2)
    for threads, told in ((0, True), (1, False)):
        plan = SimpleNamespace(runs=runs, base=SimpleNamespace(device="cpu", threads=threads),
                               run_dir=lambda key: tmp_path / key)
        lines = []
        training.train_all(plan, jobs=2, log=lines.append)
        said = [line for line in lines if "oversubscribe" in line]
        assert bool(said) == told and (not told or "--set threads=1" in said[0]), lines


def test_a_runs_device_shows_its_own_thread_count():
    assert training._device_of(SimpleNamespace(device="cpu", threads=1)).endswith(", 1 thread)")
    shown = training._device_of(SimpleNamespace(device="cpu", threads=0))  # torch's default in this process
    assert shown.endswith(f", {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})")
