"""On-disk token cache of one dataset x teacher: image token features and text embeddings (method.md 4).

Lives next to the stage-1 cache (``artifacts/cache/<dataset>/<teacher>/tokens/``) in its own files, so
the stage-1 format is untouched:

    <split>.h5                 one row per unique image of the split (sorted by image_id)
        tokens      (N, T, C)  float16  the teacher's image token features (lit: 7x7 map -> 49 x 1280)
        pooled      (N, P)     float16  pooled image feature the text-free linear probe reads
        embedding   (N, D)     float16  L2-normalised teacher image embedding (as in the stage-1 cache)
        image_id    (N,)       int64
        valid       (N,)       bool     False for images that failed to decode (rows hold zeros)
        caption/embedding (M, D), caption/sample_id (M,), caption/image_id (M,)   optional
    <split>.rejects.parquet    images that failed to decode, with the reason
    prompts-<digest>.h5        class-prompt embeddings (K, D) for one class list x template list
    summary.json               sizes of everything above

Arrays are contiguous and uncompressed, so readers memory-map them (a token cache can be far larger
than RAM). Files are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.common.errors import PipelineError
from pipeline.common import io

FORMAT = "clipdistill-tokens/1"


@dataclass(frozen=True)
class TokenMeta:
    """Attributes of one split file; a reader compares them against what it expects."""

    teacher_fingerprint: str
    teacher_name: str
    images_digest: str  # image ids + paths of the split: the same images, whatever the labels or captions
    split: str
    n_tokens: int
    token_dim: int
    pooled_dim: int
    width: int
    arch: str  # JSON: the teacher's image architecture, for a fresh student of the same kind
    dtype: str = "float16"
    format: str = FORMAT

    def to_attrs(self) -> dict:
        return asdict(self)

    @classmethod
    def from_attrs(cls, attrs) -> "TokenMeta":
        values = {}
        for k in cls.__dataclass_fields__:
            if k in attrs:
                v = attrs[k]
                values[k] = v.item() if hasattr(v, "item") else v
        try:
            return cls(**values)
        except TypeError as exc:
            raise PipelineError(f"not a token cache file (missing attributes): {exc}") from exc


def images_digest(image_ids: np.ndarray, paths: list[str]) -> str:
    h = hashlib.sha256()
    h.update(np.asarray(image_ids, dtype=np.int64).tobytes())
    h.update("\n".join(paths).encode())
    return h.hexdigest()[:16]


def split_path(directory: Path, split: str) -> Path:
    return Path(directory) / f"{split}.h5"


class TokenWriter:
    """Fills a split file batch by batch (rows pre-allocated), then publishes it with ``close``."""

    def __init__(self, path: Path, meta: TokenMeta, image_ids: np.ndarray):
        self.path = Path(path)
        io.remove_stale_tmps(self.path)
        self.tmp = io.tmp_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        n, dt = len(image_ids), np.dtype(meta.dtype)
        self.f = h5py.File(self.tmp, "w")
        # No chunks / compression: contiguous storage is what lets the reader memory-map the arrays.
        self.tokens = self.f.create_dataset(
            "tokens", (n, meta.n_tokens, meta.token_dim), dtype=dt, fillvalue=0
        )
        self.pooled = self.f.create_dataset("pooled", (n, meta.pooled_dim), dtype=dt, fillvalue=0)
        self.embedding = self.f.create_dataset("embedding", (n, meta.width), dtype=dt, fillvalue=0)
        self.f.create_dataset("image_id", data=np.asarray(image_ids, dtype=np.int64))
        self.valid = np.zeros(n, dtype=bool)
        self.f.attrs.update(meta.to_attrs())

    def write(self, rows: np.ndarray, tokens: np.ndarray, pooled: np.ndarray, embedding: np.ndarray) -> None:
        """Rows must be increasing (one decoded batch in loader order)."""
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo == len(rows):  # contiguous batch: one slice write per array
            self.tokens[lo:hi], self.pooled[lo:hi], self.embedding[lo:hi] = tokens, pooled, embedding
        else:
            for j, r in enumerate(rows.tolist()):
                self.tokens[r], self.pooled[r], self.embedding[r] = tokens[j], pooled[j], embedding[j]
        self.valid[rows] = True

    def write_captions(self, embedding: np.ndarray, sample_id: np.ndarray, image_id: np.ndarray) -> None:
        g = self.f.create_group("caption")
        g.create_dataset("embedding", data=np.ascontiguousarray(embedding, dtype=self.embedding.dtype))
        g.create_dataset("sample_id", data=np.asarray(sample_id, dtype=np.int64))
        g.create_dataset("image_id", data=np.asarray(image_id, dtype=np.int64))

    def close(self) -> Path:
        # Rows of undecodable images were never written; zero them so every byte is allocated and defined.
        for r in np.flatnonzero(~self.valid).tolist():
            self.tokens[r] = 0
        self.f.create_dataset("valid", data=self.valid)
        self.f.close()
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        self.tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _memmap(path: Path, dset: h5py.Dataset) -> np.ndarray:
    if dset.size == 0:
        return np.zeros(dset.shape, dtype=dset.dtype)
    offset = dset.id.get_offset()
    if offset is None or dset.chunks is not None or dset.compression is not None:
        raise PipelineError(f"{path}:{dset.name} is not contiguous; cannot memory-map it")
    return np.memmap(path, dtype=dset.dtype, mode="r", offset=offset, shape=dset.shape)


class TokenSplit:
    """A split file opened read-only: memory-mapped arrays of the decoded images, and id lookups."""

    def __init__(self, path: str | Path, expect_fingerprint: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise PipelineError(f"no token cache at {self.path}; run `clipdistill teacher-tokens` first")
        try:
            with h5py.File(self.path, "r") as f:
                self.meta = TokenMeta.from_attrs(f.attrs)
                valid = f["valid"][()]
                self.image_ids = f["image_id"][()][valid]
                arrays = {k: _memmap(self.path, f[k]) for k in ("tokens", "pooled", "embedding")}
                self.has_captions = "caption" in f
                if self.has_captions:
                    g = f["caption"]
                    self.caption_embedding = g["embedding"][()]
                    self.caption_sample_ids = g["sample_id"][()]
                    self.caption_image_ids = g["image_id"][()]
        except (OSError, KeyError) as exc:
            raise PipelineError(f"cannot read token cache {self.path}: {exc}") from exc
        if self.meta.format != FORMAT:
            raise PipelineError(f"{self.path} has format {self.meta.format}, expected {FORMAT}")
        if expect_fingerprint is not None and expect_fingerprint != self.meta.teacher_fingerprint:
            raise PipelineError(
                f"{self.path} was made by teacher {self.meta.teacher_fingerprint}, "
                f"expected {expect_fingerprint}"
            )
        self._rows = np.flatnonzero(valid)  # file row of each decoded image
        self._tokens, self._pooled, self._embedding = arrays["tokens"], arrays["pooled"], arrays["embedding"]

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def arch(self) -> dict:
        return json.loads(self.meta.arch)

    def rows_of(self, image_ids) -> np.ndarray:
        """Positions (0..len-1) of the given image ids; a missing id is a PipelineError."""
        wanted = np.asarray(image_ids, dtype=np.int64)
        if len(self.image_ids) == 0:
            pos, missing = np.zeros(len(wanted), np.int64), np.ones(len(wanted), bool)
        else:
            pos = np.searchsorted(self.image_ids, wanted).clip(max=len(self.image_ids) - 1)
            missing = self.image_ids[pos] != wanted
        if np.any(missing):
            raise PipelineError(
                f"{int(np.sum(missing))} images have no cached tokens in {self.path} "
                f"(e.g. {wanted[missing][:3].tolist()}); rerun teacher-tokens for this manifest"
            )
        return pos

    def _gather(self, arr: np.ndarray, positions) -> np.ndarray:
        rows = self._rows[np.asarray(positions, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")  # forward reads through the file
        out = np.empty((len(rows), *arr.shape[1:]), dtype=np.float32)
        out[order] = arr[rows[order]]
        return out

    def tokens(self, positions) -> np.ndarray:
        return self._gather(self._tokens, positions)

    def pooled(self, positions=None) -> np.ndarray:
        return self._gather(self._pooled, np.arange(len(self)) if positions is None else positions)

    def embedding(self, positions=None) -> np.ndarray:
        return self._gather(self._embedding, np.arange(len(self)) if positions is None else positions)

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size


def prompts_digest(classes: list[str], templates: list[str]) -> str:
    return hashlib.sha256(json.dumps([classes, templates]).encode()).hexdigest()[:12]


def prompts_path(directory: Path, classes: list[str], templates: list[str]) -> Path:
    return Path(directory) / f"prompts-{prompts_digest(classes, templates)}.h5"


def write_prompts(
    path: Path, embedding: np.ndarray, classes: list[str], templates: list[str], teacher_fingerprint: str
) -> Path:
    with io.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("embedding", data=np.asarray(embedding, dtype=np.float32))
        f.attrs.update(
            classes=json.dumps(classes),
            templates=json.dumps(templates),
            teacher_fingerprint=teacher_fingerprint,
            format=FORMAT,
        )
    return path


def read_prompts(
    directory: Path, classes: list[str], templates: list[str], expect_fingerprint: str | None = None
) -> np.ndarray:
    """(K, D) prompt embeddings for exactly this class list and these templates."""
    path = prompts_path(directory, classes, templates)
    if not path.is_file():
        raise PipelineError(
            f"no class-prompt embeddings for these {len(classes)} classes and templates in "
            f"{directory}; run `clipdistill teacher-tokens` with the same config"
        )
    with h5py.File(path, "r") as f:
        fingerprint = f.attrs["teacher_fingerprint"]
        emb = f["embedding"][()]
    if expect_fingerprint is not None and fingerprint != expect_fingerprint:
        raise PipelineError(f"{path} was made by teacher {fingerprint}, expected {expect_fingerprint}")
    return emb


__all__ = [
    "TokenMeta",
    "TokenWriter",
    "TokenSplit",
    "images_digest",
    "split_path",
    "prompts_path",
    "write_prompts",
    "read_prompts",
    "FORMAT",
]
