"""Stage 1: a short runner over one manifest split's shard plan, with the reader, mapper and writer apart.

    reader (features.reader.SplitReader)   a shard's images and captions, from the manifest
    mapper (features.mapper.FeatureMapper) the teacher pass, device input included -> arrays
    writer (features.shard_writer.ShardWriter) publishes the shard (atomic, checksums)

Work is cut into shards of ``shard_size`` unique images (sorted by image_id) plus their captions. Process k of P
(``shard_index``/``num_shards``) owns the shards s with s % P == k, so Make -j, SLURM arrays or torchrun ranks
can split a split. Complete shards are skipped on a rerun, so a killed job resumes where it stopped (at shard
granularity). The summary reports read, model and write time apart.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
from tqdm import tqdm

import pipeline
from pipeline.common import io
from pipeline.common.errors import PipelineError
from pipeline.common.kill_switch import kill_self, read_switch
from pipeline.data.manifest import Manifest
from pipeline.features.cache.format import SHARD_RE, CacheMeta
from pipeline.features.mapper import FeatureMapper
from pipeline.features.reader import SplitReader
from pipeline.features.shard_writer import ShardWriter
from pipeline.features.views import ViewSpec
from pipeline.teachers.base import Teacher

# Testing switch (pipeline.common.kill_switch): CLIPDISTILL_KILL_AFTER_SHARDS=N kills the process right after it
# has published its N-th shard (the next shard maybe mapped).
KILL_SWITCH = "CLIPDISTILL_KILL_AFTER_SHARDS"


@dataclass
class FeatureJob:
    """What to encode and how; one split of one dataset."""

    manifest: Manifest
    dataset: str
    split: str
    out_dir: Path
    shard_size: int = 4096
    shard_index: int = 0
    num_shards: int = 1
    batch_size: int = 64
    text_batch_size: int = 256
    num_workers: int = 2
    dtype: str = "float16"
    decode: str = "auto"  # auto | cpu | device: where images are decoded and preprocessed (features.device_input)
    views: ViewSpec | None = None  # cached augmented views per image (features.views); None: the eval view only

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        if self.dtype not in ("float16", "float32"):
            raise PipelineError(f"--dtype must be float16 or float32, not {self.dtype}")
        if not 0 <= self.shard_index < self.num_shards:
            raise PipelineError(f"--shard-index {self.shard_index} is outside [0, --num-shards={self.num_shards})")
        if self.shard_size < 1:
            raise PipelineError("--shard-size must be at least 1")


@dataclass
class FeatureSummary:
    split: str
    out_dir: Path
    shards_written: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    shards_busy: list[str] = field(default_factory=list)  # being written by another live process
    images: int = 0
    texts: int = 0
    rejects: int = 0
    seconds: float = 0.0
    read_seconds: float = 0.0  # planning shards + waiting for input batches (file reads, decoding, preprocessing)
    model_seconds: float = 0.0  # the teacher pass (mapper time less its waits for input)
    write_seconds: float = 0.0  # publishing shards, on the writer thread (overlaps the next shard's mapping)
    complete: bool = False

    @property
    def items_per_second(self) -> float:
        return (self.images + self.texts) / self.seconds if self.seconds > 0 else 0.0

    def written(self, name: str, images: int, texts: int, rejects: int) -> None:
        """Count a shard this job published (every engine counts through here)."""
        self.shards_written.append(name)
        self.images += images
        self.texts += texts
        self.rejects += rejects

    def busy(self, name: str) -> None:
        """A shard another live process is writing: left to it, and said."""
        self.shards_busy.append(name)
        tqdm.write(f"note: {name} is being written by another process; left to it")


def cache_meta(job: FeatureJob, teacher: Teacher, total_shards: int) -> CacheMeta:
    return CacheMeta(
        teacher_fingerprint=teacher.fingerprint(), teacher_name=teacher.name, width=int(teacher.width),
        dtype=job.dtype, manifest_hash=job.manifest.content_hash, dataset=job.dataset, split=job.split,
        shard_size=job.shard_size, total_shards=total_shards, package_version=pipeline.__version__,
        views=job.views.count if job.views else 0, view_spec=job.views.to_json() if job.views else "",
    )


def _check_existing(path: Path, expected: CacheMeta) -> None:
    with h5py.File(path, "r") as f:
        found = CacheMeta.from_attrs(f.attrs)
    if found != expected:
        diffs = [k for k in expected.to_attrs() if getattr(found, k, None) != getattr(expected, k)]
        raise PipelineError(
            f"{path} exists but was made differently ({', '.join(diffs)} differ); "
            "delete the directory or choose another --out"
        )


def run_feature_job(job: FeatureJob, teacher: Teacher, progress: bool = True) -> FeatureSummary:
    """Encode the job's shards with ``teacher`` and write them; returns what was done."""
    start = time.perf_counter()
    kill_after = read_switch(KILL_SWITCH, "a shard count")  # checked before anything is written
    job.out_dir.mkdir(parents=True, exist_ok=True)
    reader = SplitReader(job.manifest, job.shard_size)
    meta = cache_meta(job, teacher, reader.total)
    writer = ShardWriter(job.out_dir, meta)
    summary = FeatureSummary(split=job.split, out_dir=job.out_dir)
    pending = plan_shards(job, reader, writer, summary)
    summary.read_seconds = time.perf_counter() - start
    bar = tqdm(total=sum(reader.work(s, meta.views) for s in pending), unit="item",
               desc=f"{job.dataset}/{job.split}", disable=not progress, smoothing=0.1)
    mapper = FeatureMapper(teacher, batch_size=job.batch_size, text_batch_size=job.text_batch_size,
                           num_workers=job.num_workers, dtype=job.dtype, decode=job.decode, views=job.views,
                           known=teacher.known_embeddings(job.manifest) if pending else None)

    def write(out) -> None:  # on the writer thread
        t = time.perf_counter()
        path = writer(out)
        summary.write_seconds += time.perf_counter() - t
        summary.written(path.name, len(out.image_id), out.texts, len(out.rejects))
        if kill_after == len(summary.shards_written):  # the testing switch: this shard is published, die now
            kill_self()

    # Shard k is written (HDF5, checksums, fsync) on a thread while shard k+1 is mapped, so the device never
    # waits for the disk; at most one write is in flight, and a shard's lock is held until its file is renamed
    # into place (a killed job leaves no partial shard either way: write_shard is atomic).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as pool:
        in_flight = None
        for s in pending:
            path = writer.path(s)
            lock = contextlib.ExitStack()
            mine = lock.enter_context(io.exclusive(path))  # two processes on one shard: one writes it
            if not mine or path.exists():  # another process holds it, or finished it meanwhile
                lock.close()
                if mine:
                    summary.shards_skipped.append(path.name)
                else:
                    summary.busy(path.name)
                continue
            with contextlib.ExitStack() as on_error:
                on_error.callback(lock.close)
                t = time.perf_counter()
                inp = reader.read(s)
                summary.read_seconds += time.perf_counter() - t
                out = mapper(inp, bar.update)
                if in_flight is not None:
                    in_flight.result()  # re-raises a failed write before more work is queued
                in_flight = pool.submit(_write_then_release, write, out, lock)
                on_error.pop_all()  # queued: the writer releases the lock
        if in_flight is not None:
            in_flight.result()
    bar.close()
    summary.read_seconds += mapper.clock.read
    summary.model_seconds = mapper.clock.model
    summary.seconds = time.perf_counter() - start
    return finish_job(job, meta, summary)


def plan_shards(job: FeatureJob, reader: SplitReader, writer: ShardWriter, summary: FeatureSummary) -> list[int]:
    """This process's shards still to write (every engine uses this plan); complete ones are checked and
    counted as skipped."""
    pending = []
    for s in range(job.shard_index, reader.total, job.num_shards):
        if writer.path(s).exists():
            _check_existing(writer.path(s), writer.meta)
            summary.shards_skipped.append(writer.path(s).name)
        else:
            pending.append(s)
    return pending


def finish_job(job: FeatureJob, meta: CacheMeta, summary: FeatureSummary) -> FeatureSummary:
    """Marks the summary complete when every shard of the split is there, and then writes summary.json."""
    done = [p for p in job.out_dir.glob("shard-*.h5") if SHARD_RE.match(p.name)]
    summary.complete = len(done) == meta.total_shards
    if summary.complete:
        _write_summary(job, meta, summary)
    return summary


def _write_then_release(write, out, lock: contextlib.ExitStack) -> None:
    with lock:
        write(out)


def _write_summary(job: FeatureJob, meta: CacheMeta, summary: FeatureSummary) -> None:
    from pipeline.features.cache.reader import FeatureCache

    cache = FeatureCache(job.out_dir)
    record = {
        **meta.to_attrs(),
        "images": len(cache.image),
        "texts": len(cache.text),
        "rejects": len(cache.rejects()),
        "manifest_source": job.manifest.source,
        "bytes": sum(p.stat().st_size for p in cache.shard_paths),
    }
    io.write_json(job.out_dir / "summary.json", record)


__all__ = ["FeatureJob", "FeatureSummary", "cache_meta", "finish_job", "plan_shards", "run_feature_job"]
