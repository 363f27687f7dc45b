"""Open a cache as memory-mapped arrays with id lookups, refusing mismatched caches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from pipeline.features.cache.format import SHARD_RE, CacheMeta, shard_name
from pipeline.features.cache.integrity import check_file
from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest, Reject, read_rejects


class ShardedRows:
    """Rows of one embedding matrix spread over shard memmaps, gathered without a full copy."""

    def __init__(self, parts: Sequence[np.ndarray], width: int, dtype: np.dtype):
        self.parts = list(parts)
        self.width = width
        self.dtype = np.dtype(dtype)
        sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.width)

    def gather(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Copy the given global rows into a new (len(rows), D) array, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        if out is None:
            out = np.empty((len(rows), self.width), dtype=self.dtype)
        if len(self.parts) == 1:
            # Sorted reads walk the file forwards, which the page cache and readahead reward.
            order = np.argsort(rows, kind="stable")
            out[order] = self.parts[0][rows[order]]
            return out
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            local = rows[sel] - self.starts[s]
            order = np.argsort(local, kind="stable")
            out[sel[order]] = self.parts[s][local[order]]
        return out

    __getitem__ = gather

    def to_array(self) -> np.ndarray:
        """All rows as one in-memory array (copies)."""
        if not self.parts:
            return np.empty((0, self.width), dtype=self.dtype)
        return np.concatenate([np.asarray(p) for p in self.parts])


def _memmap(path: Path, dset: h5py.Dataset) -> np.ndarray:
    if dset.shape[0] == 0:
        return np.empty(dset.shape, dtype=dset.dtype)
    offset = dset.id.get_offset()
    if offset is None or dset.chunks is not None or dset.compression is not None:
        raise PipelineError(f"{path}:{dset.name} is not contiguous and uncompressed; cannot memory-map it")
    return np.memmap(path, dtype=dset.dtype, mode="r", offset=offset, shape=dset.shape)


def _sort_order(keys: np.ndarray) -> np.ndarray | None:
    """None when keys are already ascending (image ids always are): lookups then skip a random gather."""
    if len(keys) < 2 or np.all(keys[1:] > keys[:-1]):
        return None
    return np.argsort(keys, kind="stable")


VERIFY_ENV = "CLIPDISTILL_VERIFY"


def _check_content(shard_paths: list[Path], force: bool) -> None:
    """Refuse a cache whose shard content differs from its recorded checksums, or has none (see ``integrity``)."""
    for path in shard_paths:
        check_file(path, "cache shard", "rebuild it (delete the file and rerun teacher-features)", force=force)


class FeatureCache:
    """A complete cache directory (one dataset x teacher x split).

    Args:
        directory: the split's cache directory.
        expect_fingerprint: refuse the cache unless its teacher fingerprint equals this.
        expect_manifest_hash: refuse the cache unless it was built from this manifest content.
        verify: None (default) checks each shard's content in full when it is new here (just written or
            copied; ``pipeline.features.cache.integrity``) and cheaply otherwise; True checks every shard
            in full; False skips content checks (the attribute and shard-list checks always run).
    """

    def __init__(
        self,
        directory: str | Path,
        expect_fingerprint: str | None = None,
        expect_manifest_hash: str | None = None,
        verify: bool | None = None,
    ):
        self.directory = Path(directory)
        shard_paths = sorted(p for p in self.directory.glob("shard-*.h5") if SHARD_RE.match(p.name))
        if not shard_paths:
            raise PipelineError(f"no cache shards in {self.directory}; run `clipdistill teacher-features` first")
        metas, image_parts, text_parts, ids = [], [], [], {"image_id": [], "sample_id": [], "text_image_id": []}
        norms: dict[str, list] = {"image_norm": [], "text_norm": []}
        view_parts, view_params, lone_parts, lone_ids = [], [], [], []
        for path in shard_paths:
            try:
                f = h5py.File(path, "r")
            except OSError as exc:  # truncated, or not HDF5 at all
                raise PipelineError(f"unreadable cache shard {path} ({str(exc).splitlines()[0]}); delete it and "
                                    "rerun teacher-features") from None
            with f:
                metas.append(CacheMeta.from_attrs(f.attrs))
                image_parts.append(_memmap(path, f["image"]))
                text_parts.append(_memmap(path, f["text"]))
                for key in ids:
                    ids[key].append(f[key][()])
                for key in norms:  # optional (caches written before norms were stored lack them)
                    norms[key].append(f[key][()] if key in f else None)
                if "lone_text" in f:  # caption-only rows' texts (shard 0)
                    lone_parts.append(_memmap(path, f["lone_text"]))
                    lone_ids.append(f["lone_sample_id"][()])
                if "image_views" in f:  # (n, K, D) read as (n * K, D): row = image row * K + view
                    v = _memmap(path, f["image_views"])
                    view_parts.append(v.reshape(-1, v.shape[-1]))
                    view_params.append(f["view_params"][()])
        self.meta = metas[0]
        for path, m in zip(shard_paths, metas):
            if m != self.meta:  # every shard of one cache carries identical attributes
                differ = [f"{k} {getattr(m, k)!r} vs {getattr(self.meta, k)!r}" for k in m.__dataclass_fields__
                          if getattr(m, k) != getattr(self.meta, k)]
                raise PipelineError(f"{path} belongs to another cache than {shard_paths[0].name} "
                                    f"({'; '.join(differ[:2])}); remove it or rebuild the cache")
        expected = [shard_name(i, self.meta.total_shards) for i in range(self.meta.total_shards)]
        missing = [n for n in expected if n not in {p.name for p in shard_paths}]
        if missing or len(shard_paths) != self.meta.total_shards:
            what = f"missing {', '.join(missing[:3])}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise PipelineError(
                f"cache {self.directory} is incomplete: {len(shard_paths)} of {self.meta.total_shards} shards "
                f"({what or 'shards of another shard count'}); rerun teacher-features to finish it, or copy "
                "the missing files")
        if verify is None and os.environ.get(VERIFY_ENV) == "1":  # `distill --verify` (also reaches DDP ranks)
            verify = True
        if verify is not False:
            _check_content(shard_paths, force=bool(verify))
        if expect_fingerprint is not None and expect_fingerprint != self.meta.teacher_fingerprint:
            raise PipelineError(
                f"cache {self.directory} was made by teacher {self.meta.teacher_fingerprint}, "
                f"expected {expect_fingerprint}"
            )
        if expect_manifest_hash is not None and expect_manifest_hash != self.meta.manifest_hash:
            raise PipelineError(
                f"cache {self.directory} was built from manifest {self.meta.manifest_hash}, "
                f"but the manifest now hashes to {expect_manifest_hash}; rebuild the cache"
            )
        dtype = np.dtype(self.meta.dtype)
        self.image = ShardedRows(image_parts, self.meta.width, dtype)
        self.text = ShardedRows(text_parts, self.meta.width, dtype)
        self.image_ids = np.concatenate(ids["image_id"])
        self.sample_ids = np.concatenate(ids["sample_id"])
        self.text_image_ids = np.concatenate(ids["text_image_id"])
        # Teacher norms before L2 normalisation, (n_images,) / (n_texts,) float32, or None if not stored.
        self.image_norm, self.text_norm = (
            None if any(p is None for p in parts) else np.concatenate(parts).astype(np.float32)
            for parts in (norms["image_norm"], norms["text_norm"])
        )
        # Caption-only rows (no image): their teacher texts, kept apart from ``text`` (whose rows all have an image).
        self.lone_text = ShardedRows(lone_parts, self.meta.width, dtype)
        self.lone_sample_ids = np.concatenate(lone_ids) if lone_ids else np.empty(0, np.int64)
        # Cached augmented views (features/views.py): K per image, or none.
        self.view_count = self.meta.views
        self.views = ShardedRows(view_parts, self.meta.width, dtype) if self.view_count else None
        self.view_params = np.concatenate(view_params) if self.view_count else None
        if self.view_count and len(self.views) != len(self.image) * self.view_count:
            raise PipelineError(f"cache {self.directory}: {len(self.views)} view rows for {len(self.image)} images "
                                f"x {self.view_count} views; rebuild it")
        self._image_order = _sort_order(self.image_ids)
        self._sample_order = _sort_order(self.sample_ids)
        self.shard_paths = shard_paths

    @property
    def width(self) -> int:
        return self.meta.width

    # ---- id lookups -------------------------------------------------------------
    @staticmethod
    def _rows(keys: np.ndarray, order: np.ndarray | None, wanted, what: str) -> np.ndarray:
        wanted = np.asarray(wanted, dtype=np.int64)
        if len(keys) == 0:
            missing = np.ones(len(wanted), dtype=bool)
            rows = np.zeros(len(wanted), dtype=np.int64)
        else:
            pos = np.searchsorted(keys, wanted, sorter=order).clip(max=len(keys) - 1)
            rows = pos if order is None else order[pos]
            missing = keys[rows] != wanted
        if np.any(missing):
            bad = wanted[missing][:5].tolist()
            raise PipelineError(f"{int(np.sum(missing))} {what} not in cache (e.g. {bad}); were they rejected?")
        return rows

    def image_rows(self, image_ids) -> np.ndarray:
        """Row indices into ``image`` for the given image ids."""
        return self._rows(self.image_ids, self._image_order, image_ids, "image ids")

    def view_rows(self, image_rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Row indices into ``views`` for view ``views[i]`` of image row ``image_rows[i]``."""
        views = np.asarray(views, np.int64)
        if self.views is None or (views.size and views.max() >= self.view_count):
            raise PipelineError(f"cache {self.directory} holds {self.view_count} views per image; view "
                                f"{int(views.max()) if views.size else 0} asked for")
        return np.asarray(image_rows, np.int64) * self.view_count + views

    def text_rows(self, sample_ids) -> np.ndarray:
        """Row indices into ``text`` for the given manifest sample ids."""
        return self._rows(self.sample_ids, self._sample_order, sample_ids, "sample ids")

    def images_by_id(self, image_ids) -> np.ndarray:
        return self.image.gather(self.image_rows(image_ids))

    def texts_by_sample_id(self, sample_ids) -> np.ndarray:
        return self.text.gather(self.text_rows(sample_ids))

    def text_image_rows(self) -> np.ndarray:
        """For every cached caption, the row of its image in ``image`` (the evaluation ground truth)."""
        return self.image_rows(self.text_image_ids)

    def rejects(self) -> list[Reject]:
        out: list[Reject] = []
        for p in sorted(self.directory.glob("shard-*.rejects.parquet")):
            out.extend(read_rejects(p))
        return out

    def __repr__(self) -> str:
        return (
            f"FeatureCache({self.directory}, teacher={self.meta.teacher_fingerprint}, "
            f"images={len(self.image)}, texts={len(self.text)}, width={self.width}, dtype={self.meta.dtype})"
        )


__all__ = ["FeatureCache", "ShardedRows"]


def open_cached_split(manifest_dir: str | Path, cache_dir: str | Path, split: str, required: bool = True):
    """(manifest, its cache) of one split; (None, None) when either is missing and not ``required``."""
    from pipeline.common import paths

    manifest_path, split_dir = paths.manifest_path(manifest_dir, split), paths.cache_split_dir(cache_dir, split)
    if not manifest_path.exists() or not split_dir.exists():
        if required:
            raise PipelineError(f"need {manifest_path} and a cache in {split_dir}; run `make teacher-features`")
        return None, None
    manifest = Manifest.read(manifest_path)
    return manifest, FeatureCache(split_dir, expect_manifest_hash=manifest.content_hash)
