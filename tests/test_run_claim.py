"""One process trains a run folder at a time: a second one (another sweep runner, a second terminal) is refused
with a one-line error, a killed holder's lock is taken over, and a process may re-enter its own claim."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.common import io
from pipeline.common.errors import PipelineError
from pipeline.train.state import claim_run_dir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
CLAIM = "import sys; from pipeline.train.state import claim_run_dir\nwith claim_run_dir(sys.argv[1]): print('trained')"


def _other_process_claims(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLAIM, str(run)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_claim_is_exclusive_reentrant_and_released(tmp_path):
    run = tmp_path / "runs" / "r1"
    with claim_run_dir(run):
        with claim_run_dir(run):  # the same process again (classify's both steps in one call)
            assert io.read_lock(run / "training.lock").pid == os.getpid()
        other = _other_process_claims(run)
        assert other.returncode != 0 and "trained" not in other.stdout
        assert f"being trained by another process (pid {os.getpid()})" in other.stderr
    assert not (run / "training.lock").exists()
    assert _other_process_claims(run).stdout.strip() == "trained"


def test_trainers_refuse_a_run_another_process_trains_and_take_over_a_dead_ones_lock(tmp_path):
    from pipeline.distill.trainer import DistillConfig, train

    runs = tmp_path / "runs"
    (runs / "r1").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (runs / "r1" / "training.lock").write_text(str(holder.pid))
        with pytest.raises(PipelineError, match=f"pid {holder.pid}"):
            train(DistillConfig(runs_dir=str(runs), name="r1"))
        for command in (["classify", "--config", "configs/emoji-subgroups-rephead.yaml", "--set",
                         "data.manifest_dir=nowhere"],
                        ["adapt", "--config", "configs/icons-adapt.yaml", "--set", "start=student:nowhere/student.pt"]):
            proc = _cli(*command, "--set", f"runs_dir={runs}", "--name", "r1")
            assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert proc.stderr.strip().splitlines() == [
                f"error: run {(runs / 'r1').resolve()} is being trained by another process (pid {holder.pid}); "
                f"wait for it to finish or stop it, then resume (no such training? delete "
                f"{(runs / 'r1').resolve()}/training.lock)"
            ]
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed): its lock is stale, the command goes on to its own checks
    proc = _cli("adapt", "--config", "configs/icons-adapt.yaml", "--set", "start=student:nowhere/student.pt", "--set",
                f"runs_dir={runs}", "--name", "r1")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: student export not found: nowhere/student.pt"
    assert not (runs / "r1" / "training.lock").exists()  # released again after that failure


def test_a_trainer_runs_with_its_configs_thread_count(tmp_path):
    from types import SimpleNamespace

    import torch

    from pipeline.train.state import one_process_per_run

    trainer = one_process_per_run(lambda cfg: torch.get_num_threads())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert trainer(SimpleNamespace(runs_dir=str(tmp_path), name="r", threads=1)) == 1
        assert trainer(SimpleNamespace(runs_dir=str(tmp_path), name="r", threads=0)) == 1  # 0: left as it is
        with pytest.raises(PipelineError, match="threads must be 0"):
            trainer(SimpleNamespace(runs_dir=str(tmp_path), name="r", threads=-1))
    finally:
        torch.set_num_threads(before)
