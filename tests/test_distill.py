"""Stage 2 through the real CLI: exact resume after a kill, DDP on CPU, NaN stop, config errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.common import config as cfgio
from pipeline.common import io
from pipeline.common.errors import PipelineError
from pipeline.distill.trainer import DistillConfig, train
from pipeline.train.loop import KILL_SWITCH
from tests.gen_cache import make_cache, make_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    manifests = make_dataset(root)
    return manifests, make_cache(manifests, root / "cache")


def settings(shapes, runs: Path, *extra: str) -> list[str]:
    manifests, cache = shapes
    return [f"data.manifest_dir={manifests}", f"data.cache_dir={cache}", f"runs_dir={runs}", "student=tiny",
            "optim.batch_size=8", "optim.epochs=3", "optim.lr=1e-3", "optim.decay_epochs=[2]", "queue.size=24",
            "data.workers=0", "log_every=1", "checkpoint_every=2", *extra]


def subprocess_env() -> dict:
    """Child processes import the repo first, then whatever PYTHONPATH already holds."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


# Kill tests stop a run with the training loop's testing switch (pipeline.train.loop.KILL_SWITCH): the process
# SIGKILLs itself right after this global step, one past the first checkpoint (checkpoint_every=2), so the step it
# lost is redone on resume. A kill at a chosen step, not after a sleep that a loaded machine stretches.
KILL_STEP = 3


def cli(args: list[str], kill_at: int | None = None, **kw) -> subprocess.Popen:
    env = subprocess_env()
    if kill_at is not None:
        env[KILL_SWITCH] = str(kill_at)
    return subprocess.Popen([sys.executable, "-m", "stages.cli", *args], cwd=ROOT, env=env, **kw)


def distill_args(shapes, runs, name, *extra):
    out = ["distill", "--name", name, "--no-progress"]
    for s in settings(shapes, runs, *extra):
        out += ["--set", s]
    return out


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def kill_after_first_checkpoint(args: list[str], run_dir: Path, **kw) -> subprocess.Popen:
    """Run a training command that SIGKILLs itself one step after its first checkpoint (mid-run, nothing
    flushed); returns the dead process."""
    proc = cli(args, kill_at=KILL_STEP, **kw)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out
    assert (run_dir / "checkpoints" / "last.pt").exists()
    return proc


def test_killed_run_resumes_to_identical_weights(shapes, tmp_path):
    runs = tmp_path / "runs"
    ref = cli(distill_args(shapes, runs, "straight"))
    assert ref.wait(timeout=300) == 0
    kill_after_first_checkpoint(distill_args(shapes, runs, "killed"), runs / "killed")
    assert not (runs / "killed" / "export" / "student.pt").exists(), "the kill should land before the run ends"
    stopped_at = final_weights(runs / "killed")["state"]["global_step"]
    resumed = cli(distill_args(shapes, runs, "killed") + ["--resume"])
    assert resumed.wait(timeout=300) == 0
    a, b = final_weights(runs / "straight"), final_weights(runs / "killed")
    assert a["state"] == b["state"] and stopped_at < a["state"]["global_step"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"{key} differs after resume"
    assert repr(a["balancers"]) == repr(b["balancers"])
    for m in ("img", "txt"):
        assert a["queue"][0][m]["ptr"] == b["queue"][0][m]["ptr"]
        assert torch.equal(a["queue"][0][m]["emb"], b["queue"][0][m]["emb"])
    # the resumed run's metrics have no duplicated steps from the killed attempt
    from pipeline.common.runlog import read_metrics

    steps = [r["step"] for r in read_metrics(runs / "killed", "train")]
    assert steps == sorted(set(steps))
    assert (runs / "killed" / "export" / "student.pt").exists()


def test_two_process_ddp_on_cpu(shapes, tmp_path):
    runs = tmp_path / "runs"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "stages.cli",
            *distill_args(shapes, runs, "ddp", "max_steps=3", "device=cpu", "queue.size=64")]
    env = subprocess_env()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = final_weights(runs / "ddp")
    assert ckpt["state"]["global_step"] == 3
    assert len(ckpt["queue"]) == 2  # one queue state per rank
    q0, q1 = ckpt["queue"]
    assert q0["img"]["fill"] == 3 * 2 * 8  # 3 steps x 2 ranks x batch 8: rows gathered across ranks
    assert torch.equal(q0["img"]["emb"], q1["img"]["emb"])  # every rank holds the same queue


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(shapes, tmp_path, monkeypatch):
    from pipeline.distill import losses

    real = losses.MultiscaleDistillLoss.forward
    calls = {"n": 0}

    def flaky(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 5:
            out["fd"] = out["fd"] * float("nan")
        return out

    monkeypatch.setattr(losses.MultiscaleDistillLoss, "forward", flaky)
    cfg = cfgio.load(DistillConfig, None, settings(shapes, tmp_path / "runs"))
    with pytest.raises(PipelineError, match="non-finite at step 4"):
        train(cfg, progress=False)
    assert final_weights(tmp_path / "runs" / "default")["state"]["global_step"] == 4


def test_config_errors_are_one_line(shapes, tmp_path):
    with pytest.raises(PipelineError, match="unknown key"):
        cfgio.load(DistillConfig, None, ["optim.nope=1"])
    with pytest.raises(PipelineError, match="unknown config key"):
        p = tmp_path / "c.yaml"
        p.write_text("optim:\n  lrr: 1\n")
        cfgio.load(DistillConfig, p)
    cfg = cfgio.load(DistillConfig, None, settings(shapes, tmp_path / "runs", "max_steps=2"))
    train(cfg, progress=False)
    with pytest.raises(PipelineError, match="already has checkpoints"):
        train(cfg, progress=False)
    other = cfgio.load(DistillConfig, None, settings(shapes, tmp_path / "runs", "max_steps=2", "optim.lr=0.5"))
    with pytest.raises(PipelineError, match="optim.lr"):
        train(other, resume=True, progress=False)


def test_unnormalised_teacher_targets(shapes, tmp_path):
    import shutil

    import h5py
    import numpy as np

    from pipeline.features.cache import FeatureCache
    from pipeline.distill.data import gather_targets

    _, cache_root = shapes
    cache = FeatureCache(Path(cache_root) / "train")
    rows = np.array([3, 0, 5])
    unit_img, unit_txt = gather_targets(cache, rows, rows, normalized=True)
    raw_img, raw_txt = gather_targets(cache, rows, rows, normalized=False)
    np.testing.assert_allclose(np.linalg.norm(raw_img, axis=1), cache.image_norm[rows], rtol=2e-3)
    np.testing.assert_allclose(raw_txt / cache.text_norm[rows, None], unit_txt, atol=1e-6)
    assert not np.allclose(cache.image_norm, 1.0)  # the ablation differs from the default

    cfg = cfgio.load(DistillConfig, None, settings(shapes, tmp_path / "runs", "max_steps=2",
                                                   "data.teacher_normalized=false"))
    assert train(cfg, progress=False).steps == 2

    # a cache written without norms: a one-line error that says how to rebuild it
    old = tmp_path / "old"
    shutil.copytree(cache_root, old)
    for shard in old.glob("*/shard-*.h5"):
        with h5py.File(shard, "a") as f:
            del f["image_norm"], f["text_norm"]
    no_norms = cfgio.load(DistillConfig, None, settings(shapes, tmp_path / "runs2", "max_steps=2",
                                                        f"data.cache_dir={old}", "data.teacher_normalized=false"))
    with pytest.raises(PipelineError, match="rerun teacher-features"):
        train(no_norms, progress=False)


class _RunsCode:
    """Unpickling this runs a shell command: what a tampered checkpoint could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_and_exports_carrying_pickled_objects_are_refused(shapes, tmp_path, monkeypatch):
    """Resume, student exports and classifier exports load tensors and plain values only: even a file the user
    trusts without a checksum (--trust-unchecked) is never unpickled into code."""
    from pipeline.classify.student import load_classifier
    from pipeline.students import load_student

    cfg = cfgio.load(DistillConfig, None, settings(shapes, tmp_path / "runs", "max_steps=2"))
    result = train(cfg, progress=False)
    marker = tmp_path / "code-ran"
    last = result.run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)  # a real checkpoint is plain: this load is the proof
    torch.save({**ckpt, "state": _RunsCode(marker)}, last)
    with pytest.raises(PipelineError, match="damaged checkpoint"):  # its recorded checksum catches it first
        train(cfg, resume=True, progress=False)
    io.checksum_path(last).unlink()  # a file handed over without a checksum: refused by the checksum rule...
    with pytest.raises(PipelineError, match="refusing checkpoint .*no checksum recorded"):
        train(cfg, resume=True, progress=False)
    monkeypatch.setenv(io.TRUST_ENV, "1")  # ...and, trusted on purpose, the unpickler is the guard
    with pytest.raises(PipelineError, match="refusing checkpoint .*holds more than tensors") as err:
        train(cfg, resume=True, progress=False)
    assert "\n" not in str(err.value) and str(last) in str(err.value)

    export = torch.load(result.export_path, weights_only=True)
    torch.save({**export, "meta": _RunsCode(marker)}, tmp_path / "student.pt")  # no checksum file beside it
    with pytest.raises(PipelineError, match="refusing student export .*holds more than tensors"):
        load_student(tmp_path / "student.pt")
    torch.save({"format": "x", "blob": _RunsCode(marker)}, tmp_path / "classifier.pt")
    with pytest.raises(PipelineError, match="refusing classifier export .*holds more than tensors"):
        load_classifier(tmp_path / "classifier.pt")
    assert not marker.exists()


def test_hub_preset_offline_refuses_in_one_line_and_random_init_runs_and_says_so(shapes, tmp_path):
    env = {**subprocess_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hub-cache")}
    runs = tmp_path / "runs"
    args = distill_args(shapes, runs, "base", "student=dsmd-base", "max_steps=1")
    proc = subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "timm/vit_base_patch16_224.augreg_in21k" in errors[0] and "init: random" in errors[0]
    assert "Traceback" not in proc.stderr

    args = distill_args(shapes, runs, "random", "student=tinyvit5m-minilm", "student_overrides={init: random}",
                        "max_steps=1")
    proc = subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "starts from random weights (init: random)" in proc.stdout and "(init random)" in proc.stdout
    assert '"init": "random"' in (runs / "random" / "config.json").read_text()


def test_min_steps_stretches_small_datasets_and_moves_the_decay_points(shapes, tmp_path):
    from pipeline.distill.trainer import OptimSection, schedule_for

    assert schedule_for(OptimSection(epochs=6, decay_epochs=(4,), min_steps=0), 10) == (6, (4,))
    assert schedule_for(OptimSection(epochs=6, decay_epochs=(4,), min_steps=60), 10) == (6, (4,))  # reached
    assert schedule_for(OptimSection(epochs=6, decay_epochs=(4,), min_steps=600), 10) == (60, (40,))
    assert schedule_for(OptimSection(epochs=3, decay_epochs=(1, 2), min_steps=100), 7) == (15, (5, 10))
    proc = cli(distill_args(shapes, tmp_path, "stretch", "optim.min_steps=1000", "max_steps=1"),
               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "(stretched from 3 to reach optim.min_steps=1000)" in out
