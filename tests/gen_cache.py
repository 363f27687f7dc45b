"""Generate a small dataset (train/val/test manifests + images) and its fake-teacher cache, for stage 2/3 tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.features.job import FeatureJob, run_feature_job
from pipeline.data.manifest import Manifest, write_splits
from tests.fake_teacher import FakeTeacher

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle"]


def make_dataset(root: Path, n_images: int = 48, seed: int = 0) -> Path:
    """Coloured shapes with 1-3 captions each; split 60/20/20. Returns the manifest directory."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        img = Image.new("RGB", (40, 40), "gray")
        d = ImageDraw.Draw(img)
        box = [int(v) for v in rng.integers(2, 12, 2)] + [int(v) for v in rng.integers(28, 38, 2)]
        {"circle": d.ellipse, "square": d.rectangle, "triangle": lambda b, fill: d.polygon(
            [(b[0], b[3]), (b[2], b[3]), ((b[0] + b[2]) // 2, b[1])], fill=fill)}[shape](box, fill=colour)
        img.save(img_dir / f"{i:04d}.png")
        split = "train" if i % 5 < 3 else ("val" if i % 5 == 3 else "test")
        for c in range(1 + i % 3):
            rows.append({"sample_id": i * 10 + c, "image_id": i, "image_path": f"{i:04d}.png", "split": split,
                         "caption": f"a {colour} {shape}" + ("" if c == 0 else f" number {i} variant {c}")})
    manifest = Manifest.from_rows(rows, source="generated shapes", image_root="images")
    out = root / "manifests"
    manifest.image_root = str(img_dir)
    write_splits(manifest, out)
    return out


def make_cache(manifest_dir: Path, cache_dir: Path, width: int = 16) -> Path:
    teacher = FakeTeacher(width=width)
    for split in ("train", "val", "test"):
        m = Manifest.read(manifest_dir / f"{split}.parquet")
        run_feature_job(FeatureJob(m, "shapes", split, cache_dir / split, num_workers=0), teacher, progress=False)
    return cache_dir


def dual_teacher(root: Path, data: Path, *features_args) -> tuple[Path, str]:
    """A tiny dual encoder trained on ``data``'s pairs alone (a ``dual:`` teacher) and its stage-1 cache in
    ``root/cache`` (float32, ``features_args`` added); returns (the export, teacher-features' stdout)."""
    from tests.clirun import clipdistill

    pairs_only = [f"losses.{name}=false" for name in ("cd", "fd", "sd", "hnd")] + ["losses.pair=true",
                                                                                  "data.cache_dir="]
    sets = [f"data.manifest_dir={data}", f"runs_dir={root / 'runs'}", "student=tiny", "optim.batch_size=4",
            "optim.epochs=1", "data.workers=0", *pairs_only]
    r = clipdistill("distill", "--name", "t", "--no-progress", *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr[-2000:]
    export = root / "runs" / "t" / "export" / "student.pt"
    r = clipdistill("teacher-features", "--teacher", f"dual:{export}", "--manifest-dir", data, "--out",
                    root / "cache", "--dtype", "float32", "--workers", "0", "--no-progress", *features_args)
    assert r.returncode == 0, r.stderr[-2000:]
    return export, r.stdout
