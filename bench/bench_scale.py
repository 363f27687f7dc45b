"""How the three stages scale with the data: generated captions at 10k, 100k and 1M through stage 1 (a tiny fake
teacher), stage 2 (the tiny student, streaming images, preload off, a fixed number of steps) and stage 3 (exact
FAISS retrieval of the test split with the student). Per stage it prints the time per item and the peak RSS at
each size, and both as ratios to the first row: a per-item ratio above 1 is cost growing faster than the data.

Items: stage 1 = images + captions encoded; stage 2 = pairs trained (steps x batch, the same at every size, so any
growth is set-up or per-step cost that depends on the data size); stage 3 = test images + captions evaluated.
Each stage runs in a fresh process (``--stage``), so its peak RSS is its own (DataLoader workers off).
Images: ``--files`` generated PNGs shared by all image ids (the cost of decoding stays; the disk does not fill).

    .venv/bin/python bench/bench_scale.py [--sizes 10000,100000,1000000] [--steps 40] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

CAPTIONS_PER_IMAGE = 5
WIDTH = 64  # the fake teacher's width


def generate(root: Path, captions: int, files: int) -> Path:
    """Manifests (train/val/test = 80/10/10 by image) of ``captions`` captions, 5 per image, over ``files`` PNGs."""
    import numpy as np
    from PIL import Image, ImageDraw

    from pipeline.data.manifest import Manifest, write_splits

    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    for f in range(files):
        img = Image.new("RGB", (48, 48), "gray")
        box = [int(v) for v in rng.integers(2, 14, 2)] + [int(v) for v in rng.integers(30, 46, 2)]
        ImageDraw.Draw(img).ellipse(box, fill=colours[f % len(colours)])
        img.save(img_dir / f"{f:04d}.png")
    n_images = captions // CAPTIONS_PER_IMAGE
    rows = [{"sample_id": i * 10 + c, "image_id": i, "image_path": f"{i % files:04d}.png",
             "split": "train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test"),
             "caption": f"a {colours[i % 8]} disc number {i} seen as {c}"}
            for i in range(n_images) for c in range(CAPTIONS_PER_IMAGE)]
    manifest = Manifest.from_rows(rows, source="bench_scale", image_root=str(img_dir))
    manifest.image_root = str(img_dir)
    write_splits(manifest, root / "manifests")
    return root / "manifests"


def stage1(root: Path) -> dict:
    from pipeline.data.manifest import Manifest
    from pipeline.features.job import FeatureJob, run_feature_job
    from tests.fake_teacher import FakeTeacher

    teacher, items, seconds = FakeTeacher(width=WIDTH), 0, 0.0
    for split in ("train", "val", "test"):
        t = time.perf_counter()
        m = Manifest.read(root / "manifests" / f"{split}.parquet")
        s = run_feature_job(FeatureJob(m, "scale", split, root / "cache" / split, num_workers=0, batch_size=256,
                                       text_batch_size=1024), teacher, progress=False)
        seconds += time.perf_counter() - t
        items += s.images + s.texts
    return {"seconds": seconds, "items": items}


def stage2(root: Path, steps: int, batch: int) -> dict:
    from pipeline.common import config as cfgio
    from pipeline.distill.trainer import DistillConfig, train

    cfg = cfgio.load(DistillConfig, None, [
        f"data.manifest_dir={root / 'manifests'}", f"data.cache_dir={root / 'cache'}", f"runs_dir={root / 'runs'}",
        "name=scale", "student=tiny", "data.preload=false", "data.workers=0", f"optim.batch_size={batch}",
        f"max_steps={steps}", "optim.min_steps=0", "queue.size=256", "device=cpu", "checkpoint_every=0",
        "log_every=1000"])
    t = time.perf_counter()
    result = train(cfg, progress=False)
    return {"seconds": time.perf_counter() - t, "items": steps * batch, "export": str(result.export_path)}


def stage3(root: Path) -> dict:
    from pipeline.data.manifest import Manifest
    from pipeline.features.cache import FeatureCache
    from pipeline.retrieval.evaluate import evaluate_student

    t = time.perf_counter()
    m = Manifest.read(root / "manifests" / "test.parquet")
    record = evaluate_student(root / "runs" / "scale" / "export" / "student.pt", m, FeatureCache(root / "cache" / "test"),
                              speed=None, workers=0, batch_size=256, gpu=False)
    n = record.get("n_images", 0) + record.get("n_captions", 0) if isinstance(record, dict) else 0
    if not n:
        ids, _ = m.unique_images()
        n = len(ids) + m.table.num_rows
    return {"seconds": time.perf_counter() - t, "items": n}


def run_stage(stage: str, root: Path, args) -> dict:
    """One stage in a fresh process; its own peak RSS (ru_maxrss: KiB on Linux)."""
    proc = subprocess.run([sys.executable, __file__, "--stage", stage, "--root", str(root), "--steps", str(args.steps),
                           "--batch", str(args.batch)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="captions per run, comma-separated")
    ap.add_argument("--steps", type=int, default=40, help="stage 2's steps at every size")
    ap.add_argument("--batch", type=int, default=64, help="stage 2's batch (pairs)")
    ap.add_argument("--files", type=int, default=256, help="distinct PNG files the images point at")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run (the tests run it)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:  # a child: one stage, one JSON line
        root = Path(args.root)
        out = {"1": lambda: stage1(root), "2": lambda: stage2(root, args.steps, args.batch),
               "3": lambda: stage3(root)}[args.stage]()
        out["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return
    if args.smoke:
        args.sizes, args.steps, args.batch, args.files = "400,800", 2, 8, 8
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"captions {sizes}, {CAPTIONS_PER_IMAGE} per image, {args.files} distinct PNGs; stage 2: {args.steps} steps "
          f"x {args.batch} pairs, tiny student, streaming; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cpus")
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="scale") as tmp:
            root = Path(tmp)
            t = time.perf_counter()
            generate(root, n, args.files)
            gen = time.perf_counter() - t
            r = {"captions": n, **{s: run_stage(s, root, args) for s in "123"}}
            print(f"  {n} captions: generated in {gen:.1f}s; " + ", ".join(
                f"stage {s} {r[s]['seconds']:.1f}s ({r[s]['items']} items, {r[s]['rss_mib']:.0f} MiB)" for s in "123"),
                flush=True)
            rows.append(r)
    base = rows[0]
    header = ["captions"] + [f"s{s} {c}" for s in "123" for c in ("us/item", "x", "RSS MiB", "x")]
    lines = []
    for r in rows:
        cells = [f"{r['captions']:,}"]
        for s in "123":
            per, per0 = (r[s]["seconds"] / r[s]["items"] * 1e6, base[s]["seconds"] / base[s]["items"] * 1e6)
            cells += [f"{per:.1f}", f"{per / per0:.2f}", f"{r[s]['rss_mib']:.0f}", f"{r[s]['rss_mib'] / base[s]['rss_mib']:.2f}"]
        lines.append(cells)
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    print("\n" + "  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for cells in lines:
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    print(f"per-item time and peak RSS as ratios to the {base['captions']:,}-caption row (x columns; 1.00 = grows "
          "with the data)")


if __name__ == "__main__":
    main()
