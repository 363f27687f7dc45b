"""Transfer data: images without a caption and captions without an image that stage 2 distils on next to the
pairs (issue 13).

Users hold far more images than pairs. A transfer image has a cached teacher embedding but no caption, so it
can only feed the intra-modal terms (CD, FD and SD on images, the image-image hard-negative term) and the
image queue; the cross-modal terms keep using the pairs. Sources: the training manifest's own declared
image-only rows, and the images of any other (manifest, cache) split named in ``data.transfer`` (their
captions, if any, are ignored). Every source must be cached by the same teacher as the pairs. Transfer
captions are the mirror image: the caption-only rows of the training manifest and of the sources (stage 1
caches them as ``lone_text``), in the text terms and the text queue.

Order (exact resume): a step's transfer rows are a pure function of (seed, step, rank): the transfer images
are walked as an endless stream of seeded permutations, one per pass, and step ``s`` on rank ``r`` of
``w`` takes stream positions ``((s * w + r) * T, ... + T)``. No state, so a resumed run draws the same rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest
from pipeline.features.cache import FeatureCache, open_cached_split

# Mixed into the permutation seed so the transfer stream never mirrors the pair order of the same seed.
_STREAM_SALT = 0x7472616E
# Mask ids of transfer images: -2**62 - pool row. Pairs keep their manifest ids (>= 0), -1 is a caption-only row's
# image, transfer captions take -2 - pool row.
TRANSFER_IMAGE_IDS = -(1 << 62)


@dataclass
class TransferImages:
    """The pool of transfer images: one row per unique image, with where its teacher target lives."""

    image_ids: np.ndarray  # (N,) int64
    locations: list[str]
    caches: list[FeatureCache]  # one per source
    source: np.ndarray  # (N,) index into caches
    image_rows: np.ndarray  # (N,) row into caches[source].image
    per_source: list[tuple[str, int]] = field(default_factory=list)  # (name, images kept) for the summary
    skipped_paired: int = 0  # images left out because they are already training pairs

    def __len__(self) -> int:
        return len(self.image_ids)

    @staticmethod
    def ids_of(rows: np.ndarray) -> np.ndarray:
        """One id per pool row for the false-negative masks and the queue. Not the source's ``image_id``: readers
        number every dataset from 0, so another dataset's image 5 would pass for the pairs' image 5. A pool row is
        one image that is no training pair (files already pairs are left out), so a range of its own, below the
        transfer captions' (``TransferCaptions.ids_of``), cannot collide; it is stable across steps and resumes."""
        return TRANSFER_IMAGE_IDS - np.asarray(rows, np.int64)

    def targets(self, rows: np.ndarray, views: np.ndarray | None = None) -> np.ndarray:
        """(len(rows), D) float32 teacher image embeddings of transfer rows, gathered source by source; with
        ``views``, the teacher's embedding of that cached view of each row."""
        width = self.caches[0].width
        out = np.empty((len(rows), width), np.float32)
        src = self.source[rows]
        for s in np.unique(src):
            pick, cache = src == s, self.caches[int(s)]
            image_rows = self.image_rows[rows[pick]]
            if views is None:
                out[pick] = cache.image.gather(image_rows).astype(np.float32)
            else:
                out[pick] = cache.views.gather(cache.view_rows(image_rows, views[pick])).astype(np.float32)
        return out

    def view_params(self, count: int) -> np.ndarray:
        """(N, count, 5) recorded parameters of the first ``count`` cached views of every row."""
        out = np.empty((len(self), count, 5), np.float32)
        for s, cache in enumerate(self.caches):
            pick = self.source == s
            if not pick.any():
                continue
            if cache.view_count < count:
                raise PipelineError(f"data.views={count}, but transfer cache {cache.directory} holds "
                                    f"{cache.view_count} views per image: rebuild it with teacher-features "
                                    f"--views {count} (or more)")
            out[pick] = cache.view_params[self.image_rows[pick], :count]
        return out


def _cached_images(manifest: Manifest, cache: FeatureCache, only_image_only: bool) -> tuple[np.ndarray, list[str]]:
    """Unique (image id, location) of a manifest's rows whose image the cache holds (stage-1 rejects are not)."""
    if only_image_only:
        mask = manifest.image_only_mask()
        ids = manifest.column("image_id").astype(np.int64)[mask]
        paths = [p for p, m in zip(manifest.table.column("image_path").to_pylist(), mask) if m]
        first = dict(zip(ids.tolist(), paths))
        ids = np.asarray(sorted(first), np.int64)
        paths = [first[i] for i in ids.tolist()]
    else:
        ids, paths = manifest.unique_images()
    held = np.isin(ids, cache.image_ids)
    return ids[held], [manifest.resolve(p) for p, h in zip(paths, held) if h]


def _same_file(location: str) -> str:
    """A location's key for "is this the same image file": a.b/../x and ./x name one file (tar members keep
    their ``::member``); the emoji corpus names openmoji's train images as ../openmoji/images/..."""
    path, sep, member = location.partition("::")
    return os.path.normpath(os.path.abspath(path)) + sep + member


@dataclass(frozen=True)
class Source:
    """One ``data.transfer`` entry: a cached split whose images and/or captions are transfer data."""

    manifest_dir: str
    cache_dir: str
    split: str = "train"
    images: bool = True  # every cached image of the split (its captions ignored)
    captions: bool = False  # every cached caption of the split (its images ignored)

    @property
    def name(self) -> str:
        return f"{self.manifest_dir}/{self.split}"

    def open(self) -> tuple[Manifest, FeatureCache]:
        return open_cached_split(self.manifest_dir, self.cache_dir, self.split, required=True)


def parse_sources(sources: Sequence) -> list[Source]:
    """``data.transfer`` entries -> Sources; a malformed entry is a one-line error naming it."""
    out = []
    fields = set(Source.__dataclass_fields__)
    for i, src in enumerate(sources):
        if not isinstance(src, dict) or not {"manifest_dir", "cache_dir"} <= set(src) or set(src) - fields:
            raise PipelineError(f"data.transfer[{i}] must be a mapping with manifest_dir, cache_dir and optional "
                                f"split, images (true), captions (false), not {src!r}")
        for flag in ("images", "captions"):
            if not isinstance(src.get(flag, True), bool):
                raise PipelineError(f"data.transfer[{i}].{flag} must be true or false, not {src[flag]!r}")
        out.append(Source(**src))
    return out


def _check_teachers(caches: Sequence[FeatureCache], own: tuple[Manifest, FeatureCache] | None) -> None:
    fingerprints = {c.meta.teacher_fingerprint for c in caches}
    if own is not None:
        fingerprints.add(own[1].meta.teacher_fingerprint)
    if len(fingerprints) > 1 or len({c.width for c in caches}) > 1:
        raise PipelineError("data.transfer: every transfer cache must come from the training cache's teacher "
                            f"(found teacher fingerprints {sorted(fingerprints)})")


Opened = list  # [(Source, Manifest, FeatureCache)]: each data.transfer entry opened once


def load_transfer_data(sources: Sequence[dict], own: tuple[Manifest, FeatureCache] | None,
                       paired_locations: Sequence[str]) -> tuple["TransferImages | None", "TransferCaptions | None"]:
    """(image pool, caption pool) from ``data.transfer`` entries and the training manifest's unpaired rows; each
    source is opened once. ``own``: the training (manifest, cache); ``paired_locations``: the training pairs'
    images, whose files (and those files' captions) are never transfer data: they would be counted twice."""
    opened = [(src, *src.open()) for src in parse_sources(sources)]
    paired = {_same_file(loc) for loc in paired_locations}
    return _image_pool(opened, own, paired), _caption_pool(opened, own, paired)


def _image_pool(opened: Opened, own: tuple[Manifest, FeatureCache] | None, paired: set[str]) -> TransferImages | None:
    """The training manifest's image-only rows and every cached image of the sources with ``images``; None: no
    image at all."""
    caches: list[FeatureCache] = []
    parts: list[tuple[str, np.ndarray, list[str]]] = []
    if own is not None and own[0].image_only_mask().any():
        ids, locs = _cached_images(own[0], own[1], only_image_only=True)
        caches.append(own[1])
        parts.append(("image-only rows of the training manifest", ids, locs))
    for src, manifest, cache in opened:
        if not src.images:
            continue
        ids, locs = _cached_images(manifest, cache, only_image_only=False)
        caches.append(cache)
        parts.append((src.name, ids, locs))
    if not parts or not any(len(ids) for _, ids, _ in parts):
        return None  # no source holds an image (e.g. only caption lists)
    _check_teachers(caches, own)
    image_ids, locations, source, image_rows, per_source, skipped = [], [], [], [], [], 0
    seen: set[str] = set()
    for s, (name, ids, locs) in enumerate(parts):
        keys = [_same_file(loc) for loc in locs]
        keep = [j for j, key in enumerate(keys) if key not in paired and key not in seen]
        skipped += sum(1 for key in keys if key in paired)
        seen.update(keys[j] for j in keep)
        kept_ids = ids[keep]
        image_ids.append(kept_ids)
        locations.extend(locs[j] for j in keep)
        source.append(np.full(len(keep), s, np.int64))
        image_rows.append(caches[s].image_rows(kept_ids) if len(keep) else np.empty(0, np.int64))
        per_source.append((name, len(keep)))
    pool = TransferImages(np.concatenate(image_ids), locations, caches, np.concatenate(source),
                          np.concatenate(image_rows), per_source, skipped)
    if len(pool) == 0:
        raise PipelineError("data.transfer: no transfer image left (all rejected in stage 1, or already pairs)")
    return pool


@dataclass
class TransferCaptions:
    """The pool of transfer captions, with where their teacher targets live (a cache's ``text`` rows for a
    source's paired captions, its ``lone_text`` rows for caption-only rows)."""

    sample_ids: np.ndarray  # (N,) int64
    captions: list[str]
    hashes: np.ndarray  # (N,) caption hashes: identical captions are false negatives, as for the pairs
    banks: list  # ShardedRows of teacher text embeddings
    bank: np.ndarray  # (N,) index into banks
    rows: np.ndarray  # (N,) row into banks[bank]
    per_source: list[tuple[str, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @staticmethod
    def ids_of(rows: np.ndarray) -> np.ndarray:
        """One id per pool row for the false-negative masks, which compare ids: a transfer caption shares its image
        with nothing here, so each gets its own id below the reserved -1 (readers number images from 0 or hash
        them to 63 bits)."""
        return -2 - np.asarray(rows, np.int64)

    def targets(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.banks[0].width), np.float32)
        bank = self.bank[rows]
        for b in np.unique(bank):
            pick = bank == b
            out[pick] = self.banks[int(b)].gather(self.rows[rows[pick]]).astype(np.float32)
        return out


TEXT, LONE = 0, 1  # a transfer caption's bank in its cache: ``text`` (a paired row) or ``lone_text`` (caption-only)


def _source_captions(manifest: Manifest, cache: FeatureCache, only_caption_only: bool, paired: set[str]):
    """(sample ids, captions, banks, rows) of a split's cached captions; a caption of an image that is a training
    pair is left out (the pairs already hold it), and so is one stage 1 rejected (not in the cache)."""
    t = manifest.table
    lone_row = {int(s): r for r, s in enumerate(cache.lone_sample_ids.tolist())}
    paired_sids = set(cache.sample_ids.tolist())
    sids, caps, banks, rows = [], [], [], []
    for sid, cap, path in zip(t.column("sample_id").to_pylist(), t.column("caption").to_pylist(),
                              t.column("image_path").to_pylist()):
        if cap is None or (only_caption_only and path is not None):
            continue
        if path is None and sid in lone_row:
            sids.append(sid), caps.append(cap), banks.append(LONE), rows.append(lone_row[sid])
        elif path is not None and sid in paired_sids and _same_file(manifest.resolve(path)) not in paired:
            sids.append(sid), caps.append(cap), banks.append(TEXT), rows.append(-1)
    sids, banks, rows = np.asarray(sids, np.int64), np.asarray(banks, np.int64), np.asarray(rows, np.int64)
    if (banks == TEXT).any():
        rows[banks == TEXT] = cache.text_rows(sids[banks == TEXT])
    return sids, caps, banks, rows


def _caption_pool(opened: Opened, own: tuple[Manifest, FeatureCache] | None,
                  paired: set[str]) -> TransferCaptions | None:
    """Caption-only rows of the training manifest, and every cached caption of the sources with ``captions``
    (their images ignored). None: no caption."""
    named = [("caption-only rows of the training manifest", *own, True)] if own is not None else []
    named += [(src.name, manifest, cache, False) for src, manifest, cache in opened if src.captions]
    sample_ids, captions, banks, bank, rows, per_source = [], [], [], [], [], []
    for name, manifest, cache, only_lone in named:
        sids, caps, which, where = _source_captions(manifest, cache, only_lone, paired)
        if not caps:
            continue
        bank.append(which + len(banks))
        banks += [cache.text, cache.lone_text]  # indexed by TEXT, LONE
        sample_ids.append(sids), captions.extend(caps), rows.append(where)
        per_source.append((name, len(caps)))
    if not captions:
        return None
    _check_teachers([cache for _, _, cache, _ in named], own)
    from pipeline.distill.losses import caption_hashes

    return TransferCaptions(np.concatenate(sample_ids), captions, caption_hashes(captions), banks,
                            np.concatenate(bank), np.concatenate(rows), per_source)


def transfer_batch_size(ratio: float, batch_size: int) -> int:
    """Transfer images per step: ``round(ratio x batch size)``; ratio 0 turns transfer off."""
    if ratio < 0:
        raise PipelineError(f"data.transfer_ratio must be >= 0, got {ratio}")
    return int(round(ratio * batch_size))


class TransferStream:
    """Which transfer rows a step takes: an endless walk over seeded permutations of the pool."""

    def __init__(self, n: int, per_step: int, seed: int, rank: int = 0, world: int = 1, salt: int = _STREAM_SALT):
        self.n, self.per_step, self.seed, self.rank, self.world, self.salt = n, per_step, seed, rank, world, salt
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, lap: int) -> np.ndarray:
        if lap not in self._perms:
            if len(self._perms) > 4:  # a step spans at most two laps; keep the cache small
                self._perms.clear()
            self._perms[lap] = np.random.default_rng([self.seed, self.salt, lap]).permutation(self.n)
        return self._perms[lap]

    def positions(self, step: int) -> np.ndarray:
        """Stream positions of a step on this rank (unique across steps and ranks: the augmentation seed)."""
        first = (step * self.world + self.rank) * self.per_step
        return np.arange(first, first + self.per_step, dtype=np.int64)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """Pool rows at stream positions."""
        laps, offs = np.divmod(np.asarray(positions, np.int64), self.n)
        return np.asarray([self._perm(int(l))[int(o)] for l, o in zip(laps, offs)], np.int64)
