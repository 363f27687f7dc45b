"""The file format of the LiT teacher's stored frozen-tower features (``<checkpoint stem>.<split>-features.npz``).

``build-lit`` writes them while training the heads; the ``lit`` teacher reads them back so stage 1 does not
run the towers twice on the same images. Neither side imports the other: both import this module.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

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

    def usable_rows(self) -> np.ndarray:
        """Rows whose image decoded (rows of a failed image cannot form a pair)."""
        return np.flatnonzero(np.isin(self.row_image_ids, self.image_ids))

    def subset(self, image_ids: np.ndarray) -> "SplitFeatures":
        keep_img = np.isin(self.image_ids, image_ids)
        keep_row = np.isin(self.row_image_ids, image_ids)
        return SplitFeatures(
            self.image_ids[keep_img], self.image_feats[keep_img], self.row_image_ids[keep_row],
            self.captions[keep_row], self.text_feats[keep_row], self.failed_ids[:0], self.failed_reasons[:0],
        )


def feature_cache_path(out_path: Path, tag: str) -> Path:
    """``artifacts/teachers/lit-openmoji.pt`` -> ``artifacts/teachers/lit-openmoji.train-features.npz``."""
    return out_path.with_name(f"{out_path.stem}.{tag}-features.npz")


def cache_key(manifest: Manifest, towers_parts: dict) -> str:
    """The features depend on the manifest rows and the towers; a change in either recomputes them."""
    key = {"version": FEATURES_VERSION, "manifest": manifest.content_hash, "image_root": manifest.image_root,
           "towers": towers_parts}
    return json.dumps(key, sort_keys=True)


def read_features(path: Path, key: str) -> SplitFeatures | None:
    """The features stored at ``path`` if they were made for ``key``; None when absent, stale, unreadable, damaged
    or without a checksum (unless trusted): the caller then encodes again and rewrites them, checksum included."""
    if not path.exists():
        return None
    problem = io.verify_file(path)
    if problem and not (problem == io.NO_CHECKSUM and io.trust_unchecked()):
        print(f"note: {path}: {problem}; not used (the towers encode these images again)")
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return SplitFeatures(**{k: z[k] for k in SplitFeatures.__dataclass_fields__})
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass  # unreadable or an older layout: the caller encodes instead
    return None


def write_features(path: Path, key: str, sf: SplitFeatures) -> None:
    with io.atomic_path(path, checksum=True) as tmp, open(tmp, "wb") as f:  # a file object: numpy adds no second ".npz"
        np.savez(f, key=np.asarray(key), **sf.__dict__)


def stored_tower_features(checkpoint: Path, manifest: Manifest, towers_parts: dict) -> SplitFeatures | None:
    """The tower features ``build-lit`` stored next to ``checkpoint`` for exactly this manifest, if any."""
    key = cache_key(manifest, towers_parts)
    for path in sorted(Path(checkpoint).parent.glob(f"{Path(checkpoint).stem}.*-features.npz")):
        found = read_features(path, key)
        if found is not None:
            return found
    return None
