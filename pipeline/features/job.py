"""Stage 1 core: run a teacher over one manifest split and write the cache shards.

Work is cut into shards of ``shard_size`` unique images (sorted by image_id) plus their
captions. Process k of P (``shard_index``/``num_shards``) owns the shards s with s % P == k,
so Make -j, SLURM arrays or torchrun ranks can split a split. Complete shards are skipped on a
rerun, so a killed job resumes where it stopped (at shard granularity).
"""

from __future__ import annotations

import contextlib
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

import pipeline
from pipeline.features.cache.format import SHARD_RE, CacheMeta, shard_name
from pipeline.features.cache.writer import write_shard
from pipeline.features.device_input import choose_decode
from pipeline.features.views import BoundView, ViewSpec, teacher_view_transform
from pipeline.common.errors import PipelineError
from pipeline.features.encode import encode_captions, encode_image_locations
from pipeline.data.manifest import Manifest, Reject, write_rejects
from pipeline.teachers.base import KnownEmbeddings, Teacher
from pipeline.common import io


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
    complete: bool = False

    @property
    def items_per_second(self) -> float:
        return (self.images + self.texts) / self.seconds if self.seconds > 0 else 0.0


def _captions_by_image(manifest: Manifest) -> tuple[dict[int, list[tuple[int, str]]], list[Reject],
                                                     list[tuple[int, str]]]:
    """(image_id -> [(sample_id, caption)] in sample_id order, rejects, caption-only [(sample_id, caption)]);
    empty captions become rejects. Declared image-only rows (null caption) add no caption: their image is cached
    for the intra-modal losses; caption-only rows (null image path) are cached apart (``lone_text``)."""
    groups: dict[int, list[tuple[int, str]]] = {}
    rejects, lone = [], []
    t = manifest.table
    for sid, iid, cap, path in zip(
        t.column("sample_id").to_pylist(),
        t.column("image_id").to_pylist(),
        t.column("caption").to_pylist(),
        t.column("image_path").to_pylist(),
    ):
        if cap is None:
            continue  # image-only row
        if not cap.strip():
            rejects.append(Reject(f"sample_id={sid}", "empty caption", path, cap))
            continue
        if path is None:
            lone.append((sid, cap))  # caption-only row
            continue
        groups.setdefault(iid, []).append((sid, cap))
    for rows in groups.values():
        rows.sort()
    return groups, rejects, sorted(lone)


def _check_existing(path: Path, expected: CacheMeta) -> None:
    with h5py.File(path, "r") as f:
        found = CacheMeta.from_attrs(f.attrs)
    if found != expected:
        diffs = [k for k in expected.to_attrs() if getattr(found, k, None) != getattr(expected, k)]
        raise PipelineError(
            f"{path} exists but was made differently ({', '.join(diffs)} differ); "
            "delete the directory or choose another --out"
        )


def _encode_shard_images(teacher: Teacher, job: FeatureJob, locations: list[str], known_rows: list,
                         known: KnownEmbeddings | None, progress, device_preprocess) -> tuple:
    """-> (embeddings, ok mask, norms, failures) for a shard's images, encoding only the unknown ones."""
    emb = np.zeros((len(locations), teacher.width), dtype=job.dtype)
    norms = np.zeros(len(locations), np.float32)
    ok = np.zeros(len(locations), dtype=bool)
    have = np.array([r is not None for r in known_rows], dtype=bool)
    if have.any():
        rows = np.array([r for r in known_rows if r is not None], dtype=np.int64)
        emb[have], norms[have], ok[have] = known.image_unit[rows], known.image_norm[rows], True
        progress(int(have.sum()))
    todo = np.flatnonzero(~have)
    sub_norms = np.zeros(len(todo), np.float32)
    sub, sub_ok, sub_failures = encode_image_locations(
        teacher, [locations[i] for i in todo], job.batch_size, job.num_workers, dtype=job.dtype,
        on_progress=progress, norms_out=sub_norms, device_preprocess=device_preprocess)
    emb[todo], norms[todo], ok[todo] = sub, sub_norms, sub_ok
    return emb, ok, norms, [(int(todo[p]), reason) for p, reason in sub_failures]


def _encode_shard_views(teacher: Teacher, job: FeatureJob, locations: list[str], image_ids: np.ndarray,
                        ok: np.ndarray, progress) -> tuple[np.ndarray, np.ndarray, list]:
    """-> (views (n, K, D), params (n, K, 5), failures) for a shard's images; an image whose view fails is a
    failure as a whole (its row would otherwise hold a zero target)."""
    spec, K = job.views, job.views.count
    transform = teacher_view_transform(teacher)
    params = np.stack([spec.params(int(i)) for i in image_ids]) if len(image_ids) else np.zeros((0, K, 5), np.float32)
    todo = np.flatnonzero(ok)
    locs = [locations[i] for i in todo for _ in range(K)]
    transforms = [BoundView(transform, params[i, k]) for i in todo for k in range(K)]
    flat, flat_ok, flat_failures = encode_image_locations(
        teacher, locs, job.batch_size, job.num_workers, dtype=job.dtype, on_progress=progress, transforms=transforms)
    views = np.zeros((len(locations), K, teacher.width), dtype=job.dtype)
    views[todo] = flat.reshape(len(todo), K, teacher.width)
    failures = {}
    for pos, reason in flat_failures:
        failures.setdefault(int(todo[pos // K]), f"view {pos % K}: {reason}")
    return views, params, sorted(failures.items())


def _encode_shard_captions(teacher: Teacher, job: FeatureJob, captions: list[str], lookup: dict[str, int],
                           known: KnownEmbeddings | None, progress) -> tuple[np.ndarray, np.ndarray]:
    """-> (embeddings, norms) for a shard's captions, encoding only those the teacher does not know."""
    out = np.zeros((len(captions), teacher.width), dtype=job.dtype)
    norms = np.zeros(len(captions), np.float32)
    rows = [lookup.get(c) for c in captions]
    have = np.array([r is not None for r in rows], dtype=bool)
    if have.any():
        idx = np.array([r for r in rows if r is not None], dtype=np.int64)
        out[have], norms[have] = known.text_unit[idx], known.text_norm[idx]
        progress(int(have.sum()))
    todo = np.flatnonzero(~have)
    sub_norms = np.zeros(len(todo), np.float32)
    out[todo] = encode_captions(teacher, [captions[i] for i in todo], job.text_batch_size, job.dtype, progress,
                                norms_out=sub_norms)
    norms[todo] = sub_norms
    return out, norms


def run_feature_job(job: FeatureJob, teacher: Teacher, progress: bool = True) -> FeatureSummary:
    """Encode the job's shards with ``teacher`` and write them; returns what was done."""
    start = time.perf_counter()
    job.out_dir.mkdir(parents=True, exist_ok=True)
    image_ids, paths = job.manifest.unique_images()
    captions, caption_rejects, lone = _captions_by_image(job.manifest)
    total = max(1, math.ceil(len(image_ids) / job.shard_size))
    meta = CacheMeta(
        teacher_fingerprint=teacher.fingerprint(),
        teacher_name=teacher.name,
        width=int(teacher.width),
        dtype=job.dtype,
        manifest_hash=job.manifest.content_hash,
        dataset=job.dataset,
        split=job.split,
        shard_size=job.shard_size,
        total_shards=total,
        package_version=pipeline.__version__,
        views=job.views.count if job.views else 0,
        view_spec=job.views.to_json() if job.views else "",
    )
    summary = FeatureSummary(split=job.split, out_dir=job.out_dir)
    pending = []
    for s in range(job.shard_index, total, job.num_shards):
        path = job.out_dir / shard_name(s, total)
        if path.exists():
            _check_existing(path, meta)
            summary.shards_skipped.append(path.name)
        else:
            pending.append(s)

    def shard_range(s: int) -> range:
        return range(s * job.shard_size, min((s + 1) * job.shard_size, len(image_ids)))

    per_image = 1 + meta.views  # the eval view, then K augmented views
    work = sum(per_image * len(shard_range(s)) + sum(len(captions.get(int(image_ids[i]), ())) for i in shard_range(s))
               + (len(lone) if s == 0 else 0) for s in pending)
    bar = tqdm(total=work, unit="item", desc=f"{job.dataset}/{job.split}", disable=not progress, smoothing=0.1)
    known = teacher.known_embeddings(job.manifest) if pending else None
    known_images = known.image_lookup() if known else {}
    known_captions = known.caption_lookup() if known else {}
    preprocess = teacher.tensor_preprocess()
    device_preprocess = preprocess if choose_decode(job.decode, teacher.device, preprocess) else None

    def encode_shard(s: int):
        """Encode shard ``s``; returns the function that writes it (run on the writer thread)."""
        idx = shard_range(s)
        locations = [job.manifest.resolve(paths[i]) for i in idx]
        rejects: list[Reject] = list(caption_rejects) if s == 0 else []  # recorded once, with shard 0
        emb, ok, image_norm, failures = _encode_shard_images(
            teacher, job, locations, [known_images.get(int(image_ids[i])) for i in idx], known, bar.update,
            device_preprocess)
        views = params = None
        if meta.views:
            views, params, view_failures = _encode_shard_views(teacher, job, locations, image_ids[list(idx)], ok,
                                                               bar.update)
            for pos, _ in view_failures:
                ok[pos] = False
            failures = failures + view_failures
            bar.update(meta.views * int((~ok).sum() - len(view_failures)))  # views never drawn for failures
        for pos, reason in failures:
            rows = captions.get(int(image_ids[idx[pos]]), [])
            rejects += [Reject(f"sample_id={sid}", reason, paths[idx[pos]], cap) for sid, cap in rows]
            bar.update(len(rows))  # their captions are skipped, not encoded
        kept_ids = image_ids[list(idx)][ok]
        text_rows = [(sid, cap, int(iid)) for iid in kept_ids.tolist() for sid, cap in captions.get(iid, [])]
        text, text_norm = _encode_shard_captions(teacher, job, [c for _, c, _ in text_rows], known_captions,
                                                 known, bar.update)
        lone_text = None
        if s == 0 and lone:  # caption-only rows are written with shard 0
            lone_text, _ = _encode_shard_captions(teacher, job, [c for _, c in lone], known_captions, known,
                                                  bar.update)
        path = job.out_dir / shard_name(s, total)

        def write() -> None:
            write_rejects(rejects, path.with_name(path.name.replace(".h5", ".rejects.parquet")))
            write_shard(
                path, meta, emb[ok], kept_ids,
                text, np.array([r[0] for r in text_rows], np.int64), np.array([r[2] for r in text_rows], np.int64),
                image_norm=image_norm[ok], text_norm=text_norm,
                image_views=views[ok] if views is not None else None,
                view_params=params[ok] if params is not None else None,
                lone_text=lone_text, lone_sample_id=np.array([sid for sid, _ in lone], np.int64) if s == 0 else None,
            )
            summary.shards_written.append(path.name)
            summary.images += int(ok.sum())
            summary.texts += len(text_rows) + (len(lone) if s == 0 else 0)
            summary.rejects += len(rejects)
        return write

    # Shard k is written (HDF5, checksums, fsync) on a thread while shard k+1 is encoded, so the device never
    # waits for the disk; at most one write is in flight, and a shard's lock is held until its file is renamed
    # into place (a killed job leaves no partial shard either way: write_shard is atomic).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        in_flight = None
        for s in pending:
            path = job.out_dir / shard_name(s, total)
            lock = contextlib.ExitStack()
            mine = lock.enter_context(io.exclusive(path))  # two processes on one shard: one writes it
            if not mine or path.exists():  # another process holds it, or finished it meanwhile
                lock.close()
                (summary.shards_busy if not mine else summary.shards_skipped).append(path.name)
                if not mine:
                    tqdm.write(f"note: {path.name} is being written by another process; left to it")
                continue
            with contextlib.ExitStack() as on_error:
                on_error.callback(lock.close)
                write = encode_shard(s)
                if in_flight is not None:
                    in_flight.result()  # re-raises a failed write before more work is queued
                in_flight = writer.submit(_write_then_release, write, lock)
                on_error.pop_all()  # queued: the writer releases the lock
        if in_flight is not None:
            in_flight.result()
    bar.close()
    summary.seconds = time.perf_counter() - start
    done = [p for p in job.out_dir.glob("shard-*.h5") if SHARD_RE.match(p.name)]
    summary.complete = len(done) == total
    if summary.complete:
        _write_summary(job, meta, summary)
    return summary


def _write_then_release(write, lock: contextlib.ExitStack) -> None:
    with lock:
        write()


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


__all__ = ["FeatureJob", "FeatureSummary", "run_feature_job"]
