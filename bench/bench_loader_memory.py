"""Memory of stage 2's training loader: a worker forked every epoch vs one worker for the whole run.

The real ``PairDataset`` (images preloaded) and ``make_loader`` with one worker serve ``--epochs`` epochs; for
every batch the main process rewrites a ``--heap-mb`` buffer, allocated after the first batch, standing for the
activations and gradients a training step rewrites (the trainer's heap grows during the first steps). A worker
forked after that (``persistent=False``: a new worker every epoch, the old loader) shares the buffer's pages
copy-on-write, and each rewrite by the trainer leaves the old page to the worker alone: the worker ends up
holding a private copy of the whole heap. A worker forked once at the start (``persistent=True``, the loader
now) never maps the buffer. Reported per mode, at the last epoch's last batch (Linux /proc/PID/smaps_rollup):
the worker's private memory, main + worker PSS, seconds per epoch; then the ratio of the two totals.
Observed in a real run before the change (16k preloaded images, lite student, epoch 7): the worker held
4.3 GB private next to the trainer's 4.3 GB.

    .venv/bin/python bench/bench_loader_memory.py [--images 2000] [--heap-mb 1024] [--epochs 3] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from pipeline.data.manifest import Manifest  # noqa: E402
from pipeline.distill.data import AlignedRows, EpochOrder, PairDataset, make_loader  # noqa: E402


def memory_mb(pid: int) -> dict[str, float]:
    """Pss and Private_Dirty of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Pss", "Private_Dirty"):
                out[key] = int(value.split()[0]) / 1024
    return out


def measure(ds: PairDataset, n_rows: int, persistent: bool, heap_mb: int, epochs: int) -> dict[str, float]:
    order = EpochOrder(n_rows, seed=0)
    loader = make_loader(ds, order, batch_size=min(32, n_rows // 4), workers=1, seed=0, pin=False,
                         persistent=persistent)
    heap = None
    seconds = []
    for epoch in range(epochs):
        order.set_epoch(epoch)
        t0 = time.perf_counter()
        it = iter(loader)
        n = len(loader)
        for k, _batch in enumerate(it):
            if heap is None:  # the trainer's heap appears with its first step, after the first fork
                heap = np.zeros(heap_mb * 2**20 // 8)
            heap += 1.0  # a step rewrites its buffers
            if epoch == epochs - 1 and k == n - 1:
                worker = memory_mb(it._workers[0].pid)
                main = memory_mb(os.getpid())
        seconds.append(time.perf_counter() - t0)
    del heap
    return {"worker_private": worker["Private_Dirty"], "total_pss": worker["Pss"] + main["Pss"],
            "epoch_s": float(np.median(seconds))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--heap-mb", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="40 images, a 32 MB heap, 2 epochs (the tests run it)")
    args = ap.parse_args()
    if args.smoke:
        args.images, args.heap_mb, args.epochs = 40, 32, 2
    if not Path("/proc/self/smaps_rollup").exists():
        sys.exit("bench_loader_memory needs Linux /proc/PID/smaps_rollup")
    from tests.gen_cache import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp) / "shapes", n_images=args.images)
        m = Manifest.read(root / "train.parquet")
        ids, paths = m.unique_images()
        n = len(ids)
        rows = AlignedRows(ids, ids, ["x"] * n, [m.resolve(p) for p in paths], np.arange(n), np.arange(n),
                           np.zeros(n, np.int64), 0)
        tf = T.Compose([T.RandomResizedCrop(32, scale=(0.7, 1.0)), T.ToTensor()])
        ds = PairDataset(rows, tf, seed=0, preload=True, preload_size=40)
        print(f"{n} preloaded images, {args.heap_mb} MiB heap rewritten every batch, {args.epochs} epochs, 1 worker")
        results = {}
        for label, persistent in (("worker forked every epoch (old)", False), ("one worker for the run (now)", True)):
            r = results[persistent] = measure(ds, n, persistent, args.heap_mb, args.epochs)
            print(f"{label:<34} worker private {r['worker_private']:8.1f} MiB   main + worker PSS "
                  f"{r['total_pss']:8.1f} MiB   {r['epoch_s']:.2f} s/epoch")
    old, new = results[False], results[True]
    print(f"worker private memory, now / old: {new['worker_private'] / max(old['worker_private'], 1e-9):.3f}; "
          f"main + worker PSS, now / old: {new['total_pss'] / old['total_pss']:.3f}; "
          f"worker private now / heap: {new['worker_private'] / args.heap_mb:.3f} (target <= 0.1)")


if __name__ == "__main__":
    main()
