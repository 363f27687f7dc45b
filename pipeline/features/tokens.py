"""The classification token cache as one more stage-1 job: a reader (the split's images and captions), a mapper
(``Teacher.image_tokens`` and the caption pass, device input included) and a writer (``cache.tokens.TokenWriter``:
lock, atomic publish, checksums). One file per split, filled batch by batch because it can exceed RAM; read,
model and write time are reported apart, as ``run_feature_job`` does."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from pipeline.common.errors import PipelineError
from pipeline.data.loader import iter_image_batches
from pipeline.data.manifest import Manifest, Reject, write_rejects
from pipeline.features.cache.tokens import TokenMeta, TokenSplit, TokenWriter, images_digest, split_path
from pipeline.features.reader import captions_by_image
from pipeline.features.encode import PhaseClock, encode_captions
from pipeline.teachers.base import Teacher


@dataclass
class TokenSummary:
    split: str
    path: Path
    images: int = 0
    captions: int = 0
    rejects: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: bool = False
    shape: tuple = field(default_factory=tuple)  # (T, C) per image
    read_seconds: float = 0.0  # waiting for decoded batches
    model_seconds: float = 0.0  # image tokens and caption embeddings
    write_seconds: float = 0.0  # filling and publishing the file


def caption_rows(manifest: Manifest, image_ids: set) -> tuple[list[tuple[int, int, str]], list[Reject]]:
    """The reader's caption part: (sample_id, image_id, caption) of the given images in manifest order, by stage 1's
    rules (``reader.captions_by_image``: an empty caption is a recorded reject, never dropped unsaid)."""
    groups, rejects, _ = captions_by_image(manifest)
    keep = {sid for iid in image_ids for sid, _ in groups.get(iid, ())}
    t = manifest.table
    rows = [(s, i, c) for s, i, c in zip(t.column("sample_id").to_pylist(), t.column("image_id").to_pylist(),
                                         t.column("caption").to_pylist()) if s in keep]
    return rows, rejects


@dataclass
class TokenBatch:
    positions: np.ndarray  # rows of the split file
    failures: list[tuple[int, str]]
    tokens: np.ndarray | None  # (B, T, C) float32, None when the whole batch failed
    pooled: np.ndarray | None
    embedding: np.ndarray | None


class TokenMapper:
    """Built from the teacher: image batches -> token arrays, captions -> embeddings. A teacher without image
    tokens is refused here, in one line, before any image is read."""

    def __init__(self, teacher: Teacher, batch_size: int = 32, workers: int = 2):
        self.teacher, self.batch_size, self.workers = teacher, batch_size, workers
        self.arch = teacher.token_arch()
        self.clock = PhaseClock()

    def images(self, locations: list[str]) -> Iterator[TokenBatch]:
        batches = iter_image_batches(locations, self.teacher.image_transform(), self.batch_size, self.workers,
                                     self.teacher.device.type == "cuda")
        for batch in self.clock.timed(batches):
            arrays = (None, None, None)
            if batch.pixels is not None:
                t = time.perf_counter()
                arrays = tuple(a.cpu().numpy() for a in self.teacher.image_tokens(batch.pixels))
                self.clock.model += time.perf_counter() - t
            yield TokenBatch(np.asarray(batch.positions), batch.failures, *arrays)

    def captions(self, texts: list[str]) -> np.ndarray:
        t = time.perf_counter()
        out = encode_captions(self.teacher, texts)
        self.clock.model += time.perf_counter() - t
        return out


def run_token_job(teacher: Teacher, manifest: Manifest, split: str, out_dir: str | Path, *, captions: bool = True,
                  batch_size: int = 32, workers: int = 2, progress: bool = True) -> TokenSummary:
    """Write ``<out_dir>/<split>.h5`` for the manifest's images (and captions); skip it when already made."""
    started = time.perf_counter()
    image_ids, paths = manifest.unique_images()
    if len(image_ids) == 0:
        raise PipelineError(f"split {split} has no images")
    digest, path, fingerprint = images_digest(image_ids, paths), split_path(Path(out_dir), split), teacher.fingerprint()
    if path.exists():
        done = TokenSplit(path)
        if done.meta.teacher_fingerprint != fingerprint or done.meta.images_digest != digest:
            raise PipelineError(f"{path} exists but was made from other images or another teacher; "
                                "delete it or choose another tokens_dir")
        if done.has_captions or not captions:
            return TokenSummary(split, path, len(done), len(getattr(done, "caption_sample_ids", ())),
                                int(len(image_ids) - len(done)), done.nbytes, time.perf_counter() - started,
                                skipped=True, shape=(done.meta.n_tokens, done.meta.token_dim))
        path.unlink()  # made without captions, now wanted: redo (the images are the expensive part anyway)
    mapper = TokenMapper(teacher, batch_size, workers)
    locations = [manifest.resolve(p) for p in paths]
    read_s = time.perf_counter() - started
    writer: TokenWriter | None = None
    rejects: list[Reject] = []
    write_s, n_captions = 0.0, 0
    bar = tqdm(total=len(locations), unit="img", desc=f"tokens {split}", disable=not progress)
    try:
        for b in mapper.images(locations):
            rejects += [Reject(f"image_id={image_ids[pos]}", reason, paths[pos]) for pos, reason in b.failures]
            if b.tokens is not None:
                t = time.perf_counter()
                if writer is None:
                    meta = TokenMeta(fingerprint, teacher.name, digest, split, int(b.tokens.shape[1]),
                                     int(b.tokens.shape[2]), int(b.pooled.shape[1]), int(b.embedding.shape[1]),
                                     json.dumps(mapper.arch))
                    writer = TokenWriter(path, meta, image_ids)
                writer.write(b.positions, b.tokens, b.pooled, b.embedding)
                write_s += time.perf_counter() - t
            bar.update(len(b.positions) + len(b.failures))
        bar.close()
        if writer is None:
            raise PipelineError(f"no image of split {split} could be decoded (e.g. {rejects[0].reason})")
        ok = set(image_ids[writer.valid].tolist())
        if captions:
            t = time.perf_counter()
            rows, caption_rejects = caption_rows(manifest, ok)
            rejects += caption_rejects
            read_s += time.perf_counter() - t
            emb = mapper.captions([c for _, _, c in rows])
            t = time.perf_counter()
            writer.write_captions(emb, np.array([r[0] for r in rows]), np.array([r[1] for r in rows]))
            write_s += time.perf_counter() - t
            n_captions = len(rows)
        t = time.perf_counter()
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    write_rejects(rejects, path.with_name(f"{split}.rejects.parquet"))
    write_s += time.perf_counter() - t
    return TokenSummary(split, path, len(ok), n_captions, len(rejects), path.stat().st_size,
                        time.perf_counter() - started, shape=(meta.n_tokens, meta.token_dim),
                        read_seconds=read_s + mapper.clock.read, model_seconds=mapper.clock.model,
                        write_seconds=write_s)


__all__ = ["TokenMapper", "TokenSummary", "caption_rows", "run_token_job"]
