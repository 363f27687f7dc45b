"""Reinforced cache in stage 2: the cost of view replay and transfer mixing, and the cache size per view.

Five configurations of the real training step (``DistillObjective`` through ``pipeline.train.loop.train_step``,
fed by the trainer's own DataLoader, so image decoding and augmentation count):
    plain      B pairs, the student's random augmentation, whole-image teacher targets (the baseline)
    plain B+T  B + T pairs: as many student images per step as the mixed configurations
    views      B pairs replaying cached views (crop box + flip, target = the teacher's embedding of that crop)
    transfer   B pairs + T caption-less transfer images from another cache (image-only losses, image queue)
    both       views and transfer together (the reinforced recipe)
They alternate block by block over ``--rounds`` rounds so that each sees the same machine load; the median
step time of each is reported. The ratios compare steps that push the same number of images through the
student, so they measure the mechanisms, not the extra images (the student's compute per step grows with them,
and on a CPU faster than linearly between batch 64 and 96):
  * view replay: plain / views, same batch (goal >= 0.95);
  * view replay + transfer mixing: plain B+T / both (goal >= 0.95). The plain B+T step also encodes T more
    captions, so this ratio slightly flatters the mixed step; the per-image rate against plain B is printed
    too.
Cache size per view: the bytes a K-view cache adds over a cache without views, per image and view (measured on
the shard files written here: fp16 embeddings + the 5 float32 parameters of each view).

Data: generated shapes (tests/gen_cache.py) for the pairs and, with another seed, for the transfer images;
random unit-norm targets with K cached views written by ``pipeline.features.cache.write_shard``.

    .venv/bin/python bench/bench_reinforced.py [--student small] [--batch-size 64] [--transfer-ratio 0.5]
                                               [--views 10] [--steps 6] [--rounds 2] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.bench_features import environment, table  # noqa: E402
from pipeline.common import config as cfgio  # noqa: E402
from pipeline.common.distributed import DistEnv  # noqa: E402
from pipeline.data.manifest import Manifest  # noqa: E402
from pipeline.distill.trainer import DistillConfig, DistillObjective, OptimSection  # noqa: E402
from pipeline.features.cache import CacheMeta, shard_name, write_shard  # noqa: E402
from pipeline.features.views import ViewSpec  # noqa: E402
from pipeline.train.loop import LoopSettings, make_optimizer, train_step  # noqa: E402

CONFIGS = ("plain", "plain B+T", "views", "transfer", "both")


def random_view_cache(manifest: Manifest, out: Path, width: int, views: int) -> int:
    """Random unit-norm fp16 targets (and ``views`` cached views per image) as one shard; returns its bytes."""
    rng = np.random.default_rng(views)
    image_ids = manifest.unique_images()[0]
    sample_ids = manifest.column("sample_id").astype(np.int64)

    def unit(*shape):
        x = rng.standard_normal((*shape, width), dtype=np.float32)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)

    spec = ViewSpec(views) if views else None
    meta = CacheMeta("bench-random", "bench", width, "float16", manifest.content_hash, "bench", "train",
                     len(image_ids), 1, views=views, view_spec=spec.to_json() if spec else "")
    path = out / shard_name(0, 1)
    write_shard(path, meta, unit(len(image_ids)), image_ids, unit(len(sample_ids)), sample_ids,
                manifest.column("image_id").astype(np.int64),
                image_views=unit(len(image_ids), views) if views else None,
                view_params=np.stack([spec.params(int(i)) for i in image_ids]) if views else None)
    return path.stat().st_size


class Config:
    """One configuration's objective, optimiser and an endless iterator over its trainer DataLoader."""

    def __init__(self, name: str, sets: list[str], run_dir: Path, threads: int):
        cfg = cfgio.load(DistillConfig, None, sets)
        self.name, self.objective = name, DistillObjective(cfg, run_dir, torch.device("cpu"), DistEnv())
        o = self.objective
        optim = OptimSection()
        settings = LoopSettings(optim.epochs, o.steps_per_epoch, optim.lr, optim.weight_decay, decay="constant",
                                grad_clip=optim.grad_clip)
        self.optimizer, self.scheduler, self.params = make_optimizer(o, settings)
        self.grad_clip, self.step, self.epoch = optim.grad_clip, 0, 0
        self.batches = self._batches()
        self.times: list[float] = []
        self.images: list[int] = []

    def _batches(self):
        while True:
            yield from self.objective.epoch_batches(self.epoch, 0)
            self.epoch += 1

    def run(self, steps: int, record: bool) -> None:
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = next(self.batches)
            train_step(self.objective, self.optimizer, self.scheduler, self.params, self.grad_clip, batch,
                       self.step)
            self.step += 1
            if record:
                self.times.append(time.perf_counter() - t0)
                self.images.append(len(batch.pixels))

    def median_step(self) -> float:
        return float(np.median(self.times))

    def images_per_s(self) -> float:
        return float(np.median(self.images)) / self.median_step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="small")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--transfer-ratio", type=float, default=0.5, help="transfer images per pair in a step")
    ap.add_argument("--views", type=int, default=10, help="cached views per image")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per configuration and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before each block")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers (the trainer's default)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    ap.add_argument("--width", type=int, default=512, help="teacher embedding width of the random cache")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on tiny data (the tests run it)")
    args = ap.parse_args()
    if args.smoke:
        args.student, args.batch_size, args.steps, args.warmup, args.rounds = "tiny", 8, 1, 1, 1
        args.views, args.workers, args.width = 3, 0, 32
    torch.set_num_threads(args.threads)
    from tests.gen_cache import make_dataset

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        per_round = (args.warmup + args.steps) * args.rounds * len(CONFIGS)
        n = max(40, int(per_round * args.batch_size / 1.1 / max(1, len(CONFIGS))) + 40)
        pairs = make_dataset(tmp / "pairs", n_images=n)
        other = make_dataset(tmp / "other", n_images=n, seed=1)
        sizes = {}
        for name, manifests in (("pairs", pairs), ("other", other)):
            m = Manifest.read(manifests / "train.parquet")
            sizes[name] = random_view_cache(m, tmp / f"{name}-cache" / "train", args.width, args.views)
        plain_bytes = random_view_cache(Manifest.read(pairs / "train.parquet"), tmp / "no-views" / "train",
                                        args.width, 0)
        n_images = len(Manifest.read(pairs / "train.parquet").unique_images()[0])
        per_view = (sizes["pairs"] - plain_bytes) / (n_images * args.views)

        base = [f"data.manifest_dir={pairs}", f"data.cache_dir={tmp / 'pairs-cache'}", "data.val_split=none",
                f"data.workers={args.workers}", f"student={args.student}", f"optim.batch_size={args.batch_size}",
                "queue.size=1024", "seed=0", "device=cpu", "data.preload=true"]
        transfer = [f'data.transfer=[{{manifest_dir: "{other}", cache_dir: "{tmp / "other-cache"}"}}]',
                    f"data.transfer_ratio={args.transfer_ratio}"]
        n_transfer = round(args.transfer_ratio * args.batch_size)
        same_images = [s for s in base if not s.startswith("optim.batch_size")] + [
            f"optim.batch_size={args.batch_size + n_transfer}"]
        sets = {"plain": base, "plain B+T": same_images, "views": base + [f"data.views={args.views}"],
                "transfer": base + transfer, "both": base + transfer + [f"data.views={args.views}"]}
        t0 = time.perf_counter()
        configs = {k: Config(k, v, tmp / "runs" / k.replace(" ", "_"), args.threads) for k, v in sets.items()}
        print(f"student {args.student}, batch {args.batch_size} pairs (+{round(args.transfer_ratio * args.batch_size)}"
              f" transfer images), {args.views} cached views, {args.workers} loader workers, {args.threads} torch "
              f"threads; {n_images} pair images; set-up {time.perf_counter() - t0:.1f}s; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus; {environment()}")
        for r in range(args.rounds):
            for c in configs.values():  # blocks alternate, so every configuration sees the same load
                c.run(args.warmup, record=False)
                c.run(args.steps, record=True)
            print(f"  round {r + 1} done; load average {os.getloadavg()[0]:.1f}")

    plain, same = configs["plain"], configs["plain B+T"]
    rows = [[k, f"{1e3 * c.median_step():.0f}", f"{np.median(c.images):.0f}", f"{c.images_per_s():.1f}",
             f"{(same if np.median(c.images) > args.batch_size else plain).median_step() / c.median_step():.3f}"]
            for k, c in configs.items()]
    print(f"\nmedian over {args.rounds} rounds x {args.steps} timed steps, trainer DataLoader included")
    print(table(rows, ["configuration", "median ms/step", "images/step", "images/s",
                       "step ratio vs plain with as many images"]))
    view_ratio = plain.median_step() / configs["views"].median_step()
    mixed_ratio = same.median_step() / configs["both"].median_step()
    ok = lambda r: "met" if r >= 0.95 else "NOT met"  # noqa: E731
    print(f"view replay, same batch: step-time ratio {view_ratio:.3f} (goal >= 0.95: {ok(view_ratio)})")
    print(f"view replay + transfer mixing vs the plain step with as many images: step-time ratio {mixed_ratio:.3f} "
          f"(goal >= 0.95: {ok(mixed_ratio)}); per image against plain B: "
          f"{configs['both'].images_per_s() / plain.images_per_s():.3f} (the student's compute per image grows "
          "with the batch on a CPU)")
    print(f"cache size per view: {per_view:.0f} bytes per image and view ({args.width} x fp16 + 5 x float32 "
          f"parameters); {args.views} views grow a cache of {plain_bytes / 2**20:.1f} MiB to "
          f"{sizes['pairs'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
