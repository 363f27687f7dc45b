"""The classification token cache (method.md 4): one file per split of a dataset x teacher, next to the stage-1
cache (``artifacts/cache/<dataset>/<teacher>/tokens/``), in its own files so the stage-1 format is untouched:

    <split>.h5                 one row per unique image of the split (sorted by image_id)
        tokens      (N, T, C)  float16  the teacher's image tokens (``Teacher.image_tokens``; lit: 7x7 -> 49 x 1280)
        pooled      (N, P)     float16  pooled image feature the text-free linear probe reads
        embedding   (N, D)     float16  L2-normalised teacher image embedding (as in the stage-1 cache)
        image_id    (N,)       int64
        valid       (N,)       bool     False for images that failed to decode (rows hold zeros)
        caption/embedding (M, D), caption/sample_id (M,), caption/image_id (M,)   optional
    <split>.rejects.parquet    images that failed to decode, with the reason

Arrays are contiguous and uncompressed, so readers memory-map them (a token cache can be far larger than RAM:
the writer fills rows batch by batch). Like a stage-1 shard, a file is written under its lock as a temporary,
carries ``checksum:<dataset>`` attributes (``cache/integrity.py``, read back before the rename), is published by
``common.io.atomic_path`` and is checked in full the first time it is opened where it lies, and by
``clipdistill verify``. Files written before checksums are refused unless ``--trust-unchecked``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.common import io
from pipeline.common.errors import PipelineError
from pipeline.features.cache.format import TOKEN_FORMAT
from pipeline.features.cache.integrity import CHECKSUM_PREFIX, check_file, dataset_checksum, dataset_names, stamp_path

FORMAT = TOKEN_FORMAT


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
    """Fills a split file batch by batch (rows pre-allocated), then publishes it with ``close`` (``abort`` on
    failure). Holds ``<split>.h5.lock`` from start to publish: a second process writing the same split is
    refused in one line rather than racing it."""

    def __init__(self, path: Path, meta: TokenMeta, image_ids: np.ndarray):
        self.path = Path(path)
        self._stack = contextlib.ExitStack()
        if not self._stack.enter_context(io.exclusive(self.path)):
            self._stack.close()
            raise PipelineError(f"{self.path} is being written by another process; wait for it or choose "
                                "another tokens_dir")
        if self.path.exists():  # finished by another process between the caller's look and this lock
            self._stack.close()
            raise PipelineError(f"{self.path} was written by another process meanwhile; rerun to use it")
        n, dt = len(image_ids), np.dtype(meta.dtype)
        try:
            self.tmp = self._stack.enter_context(io.atomic_path(self.path, fsync=True))
            self.f = h5py.File(self.tmp, "w")
        except BaseException:
            self._stack.close()
            raise
        # No chunks / compression: contiguous storage is what lets the reader memory-map the arrays.
        self.tokens = self.f.create_dataset("tokens", (n, meta.n_tokens, meta.token_dim), dtype=dt, fillvalue=0)
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
        # Checksums of the datasets as stored (read back a block at a time: the file may exceed RAM).
        self.f.attrs.update({CHECKSUM_PREFIX + n: dataset_checksum(self.f[n]) for n in dataset_names(self.f)})
        self.f.close()
        self._stack.close()  # fsync, rename into place, release the lock
        stamp_path(self.path).unlink(missing_ok=True)  # a rewritten file is new here: the next open checks it
        return self.path

    def abort(self) -> None:
        self.f.close()
        exc = RuntimeError("token cache write aborted")
        self._stack.__exit__(type(exc), exc, None)  # removes the temporary, releases the lock


def _memmap(path: Path, dset: h5py.Dataset) -> np.ndarray:
    if dset.size == 0:
        return np.zeros(dset.shape, dtype=dset.dtype)
    offset = dset.id.get_offset()
    if offset is None or dset.chunks is not None or dset.compression is not None:
        raise PipelineError(f"{path}:{dset.name} is not contiguous; cannot memory-map it")
    return np.memmap(path, dtype=dset.dtype, mode="r", offset=offset, shape=dset.shape)


class TokenSplit:
    """A split file opened read-only: memory-mapped arrays of the decoded images, and id lookups.

    ``verify``: None checks the content in full when the file is new to its place (then stamps it, as stage-1
    shards); True always; False never."""

    def __init__(self, path: str | Path, expect_fingerprint: str | None = None, verify: bool | None = None):
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
        except (OSError, KeyError, ValueError) as exc:  # ValueError: a truncated file is shorter than its arrays
            raise PipelineError(f"cannot read token cache {self.path}: {str(exc).splitlines()[0]}") from None
        if self.meta.format != FORMAT:
            raise PipelineError(f"{self.path} has format {self.meta.format}, expected {FORMAT}")
        if verify is not False:
            check_file(self.path, "token cache", "delete it and rerun teacher-tokens", force=bool(verify))
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


__all__ = ["FORMAT", "TokenMeta", "TokenSplit", "TokenWriter", "images_digest", "split_path"]
