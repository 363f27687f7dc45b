"""Cache benchmark on a 1M x 512 fp16 cache: random 4,096-row gathers, and what integrity checks cost.

(a) Reads: the memory-mapped reader (``FeatureCache``) against h5py's own fancy-index read of the same rows
    (the baseline), in one run. Target: <= 5 ms per gather via the reader.
(b) Integrity: the checksums ``write_shard`` computes, as a share of the shard write they belong to
    (target: within 2% of the write path), and the time of a full verification of the cache
    (every array read back and hashed, as the first open after a copy or ``clipdistill verify`` does).

    .venv/bin/python bench/bench_cache.py [--rows 1000000] [--width 512] [--batch 4096]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from pipeline.features.cache import CacheMeta, FeatureCache, shard_name, write_shard
from pipeline.features.cache.integrity import checksum_attrs, file_problems


def build_cache(directory: Path, rows: int, width: int) -> float:
    """Write the cache; returns the seconds of the ``write_shard`` call alone (checksums, HDF5, fsync)."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((rows, width), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.arange(rows, dtype=np.int64)
    meta = CacheMeta("bench", "bench", width, "float16", "bench", "bench", "train", rows, 1)
    image, text = emb.astype(np.float16), emb[:1].astype(np.float16)
    t0 = time.perf_counter()
    write_shard(directory / shard_name(0, 1), meta, image, ids, text, ids[:1], ids[:1])
    return time.perf_counter() - t0


def timed(fn, repeats: int) -> np.ndarray:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return np.array(out) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="seconds-long run (the tests run it)")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.width, args.batch, args.repeats = 5000, 64, 256, 5
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_s = build_cache(d, args.rows, args.width)
        print(f"wrote a {args.rows:,} x {args.width} fp16 cache shard in {write_s:.2f}s")
        shard = next(d.glob("shard-*.h5"))
        with h5py.File(shard, "r") as f:
            arrays = {name: f[name][()] for name in f}
        t0 = time.perf_counter()
        checksum_attrs(arrays)  # what write_shard adds to a write
        checksum_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        problems = file_problems(shard)  # a full verification: read back + hash every array
        verify_s = time.perf_counter() - t0
        assert problems == [], problems
        shard_bytes = shard.stat().st_size
        cache = FeatureCache(d)
        rng = np.random.default_rng(1)
        batches = [rng.integers(0, args.rows, args.batch) for _ in range(args.repeats)]
        cache.image.to_array()  # warm the page cache once, as a training epoch would
        it = iter(batches * 2)
        reader_ms = timed(lambda: cache.image.gather(next(it)), args.repeats)
        ids = iter(batches * 2)
        by_id_ms = timed(lambda: cache.images_by_id(next(ids)), args.repeats)
        with h5py.File(cache.shard_paths[0], "r") as f:
            dset = f["image"]
            it2 = iter(batches * 2)
            h5_ms = timed(lambda: dset[np.unique(next(it2))], max(5, args.repeats // 5))  # h5py needs sorted unique
        check = batches[0]
        assert np.array_equal(cache.image.gather(check), np.asarray(cache.image.parts[0])[check])
    print(f"{'method':<32}{'median ms':>10}{'p90 ms':>10}")
    for name, ms in (("memmap gather (reader)", reader_ms), ("memmap gather by image_id", by_id_ms),
                     ("h5py fancy read (baseline)", h5_ms)):
        print(f"{name:<32}{np.median(ms):>10.2f}{np.percentile(ms, 90):>10.2f}")
    print(f"speed-up of reader over h5py: {np.median(h5_ms) / np.median(reader_ms):.1f}x; "
          f"target <= 5 ms: {'met' if np.median(reader_ms) <= 5 else 'NOT met'}")
    share = checksum_s / max(write_s - checksum_s, 1e-9)
    print(f"checksums while writing: {checksum_s:.2f}s of a {write_s:.2f}s write_shard call -> ratio "
          f"{share:.3f} of the rest of the write (stage 1 adds the teacher's forward on top: bench_features.py)")
    print(f"full verification of the {args.rows:,} x {args.width} cache: {verify_s:.2f}s "
          f"({shard_bytes / verify_s / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
