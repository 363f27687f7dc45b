"""Fingerprints that a behaviour-preserving refactor must not change (issue-11 restructure, issue-32 one shape):

  * the sha256 over the final weights of a short CPU `distill` run (tiny student, generated data, 2 epochs);
  * the run keys of every run in sweeps/openmoji.yaml (they name the runs of the experiment tables);
  * the sha256 over every array of a stage-1 cache (`clipdistill teacher-features`, a tiny random open_clip
    teacher on generated shapes), shard by shard;
  * the sha256 over the soft targets of a classification run's step 1 (`teacher-tokens` then `rephead`,
    head and probe) on a generated class folder.

Stage 1 and classification go through the command line, so the fingerprint does not depend on library names.

    .venv/bin/python tools/reference_run.py            # prints one JSON line; compare before and after
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _cli(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(f"clipdistill {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def _hash_h5(paths: list[Path], h) -> None:
    import h5py
    import numpy as np

    for path in paths:
        with h5py.File(path, "r") as f:
            names = []
            f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
            for name in sorted(names):
                h.update(f"{path.name}/{name}".encode())
                h.update(np.ascontiguousarray(f[name][()]).tobytes())


def _tiny_openclip_teacher(root: Path) -> str:
    import open_clip
    import torch

    from pipeline.teachers.openclip import register_model_config

    register_model_config("reference-vit", TINY_VIT)
    torch.manual_seed(0)
    model = open_clip.create_model("reference-vit")
    root.mkdir(parents=True)
    torch.save(model.state_dict(), root / "open_clip_pytorch_model.bin")
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_VIT}))
    return f"openclip:reference-vit/{root}"


def _stage1_fingerprint(tmp: Path, manifests: Path, teacher: str) -> str:
    out = tmp / "stage1"
    _cli("teacher-features", "--teacher", teacher, "--manifest-dir", str(manifests), "--out", str(out),
         "--shard-size", "7", "--workers", "0", "--no-progress")
    h = hashlib.sha256()
    for split in ("train", "val", "test"):
        _hash_h5(sorted((out / split).glob("shard-*.h5")), h)
    return h.hexdigest()


def _classify_fingerprint(tmp: Path, teacher: str) -> str:
    from PIL import Image, ImageDraw

    folder = tmp / "folder"
    for i in range(48):
        shape, colour = ("circle", "square", "cross")[i % 3], ("red", "green", "blue", "white")[(i // 3) % 4]
        split = ("train", "train", "train", "train", "val", "test", "train", "train")[i // 6]
        path = folder / split / shape / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (32, 32), "gray")
        d = ImageDraw.Draw(img)
        {"circle": d.ellipse, "square": d.rectangle, "cross": lambda b, fill: d.line(b, fill=fill, width=4)}[
            shape]([6 + i % 4, 6, 26, 26 - i % 3], fill=colour)
        img.save(path)
    _cli("class-folder", str(folder), "--out", str(tmp / "cls-manifests"))
    cfg = {
        "name": "reference", "runs_dir": str(tmp / "runs"), "teacher": teacher,
        "data": {"manifest_dir": str(tmp / "cls-manifests"), "tokens_dir": str(tmp / "tokens"), "workers": 0},
        "head": {"dim": 16, "heads": 2, "epochs": 3, "batch_size": 8},
        "probe": {"epochs": 5, "batch_size": 8},
    }
    path = tmp / "classify.json"
    path.write_text(json.dumps(cfg))
    _cli("teacher-tokens", "-c", str(path), "--no-progress")
    _cli("rephead", "-c", str(path), "--no-progress")
    h = hashlib.sha256()
    run = tmp / "runs" / "reference"
    _hash_h5([run / "head" / "targets.h5"], h)
    _hash_h5([run / "probe" / "targets.h5"], h)
    return h.hexdigest()


def main() -> None:
    import torch

    from pipeline.common import config as cfgio
    from pipeline.distill.trainer import DistillConfig, train
    from pipeline.experiments.sweep import load_sweep, plan_sweep
    from tests.gen_cache import make_cache, make_dataset

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifests = make_dataset(tmp / "data")
        cache = make_cache(manifests, tmp / "cache")
        cfg = cfgio.load(DistillConfig, None, [
            f"data.manifest_dir={manifests}", f"data.cache_dir={cache}", f"runs_dir={tmp / 'runs'}",
            "student=tiny", "optim.batch_size=8", "optim.epochs=2", "queue.size=24", "data.workers=0", "name=ref"])
        run = train(cfg, progress=False)
        weights = torch.load(run.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
        teacher = _tiny_openclip_teacher(tmp / "teacher")
        stage1 = _stage1_fingerprint(tmp, manifests, teacher)
        classify = _classify_fingerprint(tmp, teacher)
    h = hashlib.sha256()
    for key in sorted(weights):
        h.update(key.encode())
        h.update(weights[key].numpy().tobytes())
    keys = sorted(plan_sweep(load_sweep(ROOT / "sweeps" / "openmoji.yaml"), ROOT / "runs" / "experiments").runs)
    print(json.dumps({"distill_weights_sha256": h.hexdigest(), "sweep_runs": len(keys),
                      "sweep_keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
                      "stage1_cache_sha256": stage1, "classify_step1_targets_sha256": classify}))


if __name__ == "__main__":
    main()
