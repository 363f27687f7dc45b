"""The file format of the LiT teacher's stored frozen-tower features (``<checkpoint stem>.<split>-features.npz``).

``build-lit`` writes them while training the heads; the ``lit`` teacher reads them back so stage 1 does not
run the towers twice on the same images. Neither side imports the other: both import this module.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.common import io
from pipeline.data.manifest import Manifest

FEATURES_VERSION = 1


@dataclass
class SplitFeatures:
    """Frozen-tower features of one manifest: decoded images and the rows (captions) that use them."""

    image_ids: np.ndarray  # (N_img,) int64, images that decoded
    image_feats: np.ndarray  # (N_img, 1280) float32
    row_image_ids: np.ndarray  # (N_rows,) int64, one per manifest row
    captions: np.ndarray  # (N_rows,) str
    text_feats: np.ndarray  # (N_rows, 384) float32
    failed_ids: np.ndarray  # (F,) int64, images that failed to decode
    failed_reasons: np.ndarray  # (F,) str
    # (N_img,) str, where each decoded image was read (real path), so another manifest naming the same files reuses
    # them; empty in files written before it was stored
    image_locations: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))

    def usable_rows(self) -> np.ndarray:
        """Rows whose image decoded (rows of a failed image cannot form a pair)."""
        return np.flatnonzero(np.isin(self.row_image_ids, self.image_ids))

    def subset(self, image_ids: np.ndarray) -> "SplitFeatures":
        keep_img = np.isin(self.image_ids, image_ids)
        keep_row = np.isin(self.row_image_ids, image_ids)
        return SplitFeatures(
            self.image_ids[keep_img], self.image_feats[keep_img], self.row_image_ids[keep_row],
            self.captions[keep_row], self.text_feats[keep_row], self.failed_ids[:0], self.failed_reasons[:0],
            self.image_locations[keep_img] if len(self.image_locations) else self.image_locations,
        )


def feature_cache_path(out_path: Path, tag: str) -> Path:
    """``artifacts/teachers/lit-openmoji.pt`` -> ``artifacts/teachers/lit-openmoji.train-features.npz``."""
    return out_path.with_name(f"{out_path.stem}.{tag}-features.npz")


def cache_key(manifest: Manifest, towers_parts: dict) -> str:
    """The features depend on the manifest rows and the towers; a change in either recomputes them."""
    key = {"version": FEATURES_VERSION, "manifest": manifest.content_hash, "image_root": manifest.image_root,
           "towers": towers_parts}
    return json.dumps(key, sort_keys=True)


def real_location(location: str) -> str:
    """One spelling per file (symlinks and ``..`` resolved); tar members keep their ``::member`` suffix."""
    path, sep, member = location.partition("::")
    return os.path.realpath(path) + sep + member


def stored_key(path: Path) -> str | None:
    """The key a stored feature file was made for (its small ``key`` member only: no hashing, no arrays); None
    when absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["key"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def read_features(path: Path, wanted: str | Callable[[str], bool]) -> SplitFeatures | None:
    """The features stored at ``path`` if its key is ``wanted`` (or satisfies it); None when absent, made for
    another key, unreadable, damaged or without a checksum (unless trusted): the caller then encodes again and
    rewrites them, checksum included. The key is read first, so a file made for something else is never hashed."""
    if not path.exists():
        return None
    key = stored_key(path)
    if key is None:
        print(f"note: {path}: not a readable tower-feature file; not used (the towers encode these images again)")
        return None
    if not (wanted(key) if callable(wanted) else key == wanted):
        return None
    problem = io.verify_file(path)
    if problem and not (problem == io.NO_CHECKSUM and io.trust_unchecked()):
        print(f"note: {path}: {problem}; not used (the towers encode these images again)")
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return SplitFeatures(**{k: z[k] for k in SplitFeatures.__dataclass_fields__ if k in z.files})
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # damaged in a way the checksum did not cover (trusted unchecked): encode instead


def write_features(path: Path, key: str, sf: SplitFeatures) -> None:
    with io.atomic_path(path, checksum=True) as tmp, open(tmp, "wb") as f:  # a file object: numpy adds no second ".npz"
        np.savez(f, key=np.asarray(key), **sf.__dict__)


def _stored_paths(checkpoint: Path) -> list[Path]:
    return sorted(Path(checkpoint).parent.glob(f"{Path(checkpoint).stem}.*-features.npz"))


def stored_tower_features(checkpoint: Path, manifest: Manifest, towers_parts: dict) -> SplitFeatures | None:
    """The tower features ``build-lit`` stored next to ``checkpoint`` for this manifest: the file made for exactly
    these rows, else (e.g. the benchmark's train split, whose images the corpus also holds) the features of every
    image and caption of it that a stored file of the same towers holds, by file and by text; None when none is."""
    key = cache_key(manifest, towers_parts)
    for path in _stored_paths(checkpoint):
        found = read_features(path, key)
        if found is not None:
            return found
    return _features_by_location(checkpoint, manifest, towers_parts)


def _same_towers(towers_parts: dict) -> Callable[[str], bool]:
    towers = json.loads(json.dumps(towers_parts))

    def wanted(key: str) -> bool:
        try:
            parsed = json.loads(key)
        except ValueError:
            return False
        return isinstance(parsed, dict) and parsed.get("version") == FEATURES_VERSION and parsed.get("towers") == towers
    return wanted


def _features_by_location(checkpoint: Path, manifest: Manifest, towers_parts: dict) -> SplitFeatures | None:
    image_ids, paths = manifest.unique_images()
    wanted = {real_location(manifest.resolve(p)): i for i, p in zip(image_ids.tolist(), paths)}
    captions = manifest.table.column("caption").to_pylist()
    wanted_text = set(captions)
    img_ids, img_feats, text_of, width = [], [], {}, 0
    same_towers = _same_towers(towers_parts)
    for path in _stored_paths(checkpoint):
        sf = read_features(path, same_towers)
        if sf is None:
            continue
        width = sf.image_feats.shape[1]
        for row, loc in enumerate(sf.image_locations.tolist()):
            if loc in wanted:
                img_ids.append(wanted.pop(loc))
                img_feats.append(sf.image_feats[row])
        for cap, feat in zip(sf.captions.tolist(), sf.text_feats):
            if cap in wanted_text and cap not in text_of:
                text_of[cap] = feat
    if not img_ids and not text_of:
        return None
    known = sorted(text_of)
    return SplitFeatures(
        image_ids=np.asarray(img_ids, np.int64), image_feats=np.asarray(img_feats, np.float32).reshape(-1, width),
        row_image_ids=np.full(len(known), -1, np.int64), captions=np.asarray(known, dtype=str),
        text_feats=np.asarray([text_of[c] for c in known], np.float32).reshape(len(known), -1),
        failed_ids=np.zeros(0, np.int64), failed_reasons=np.array([], dtype=str),
    )
