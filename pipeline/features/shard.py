"""What stage 1's parts hand each other: a shard's read input (reader -> mapper) and its arrays (mapper -> writer).

Plain data, so a mapper can run elsewhere (a later Ray engine runs it in actors) and a writer on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.data.manifest import Reject


@dataclass
class ShardInput:
    """One shard as read from the manifest: a contiguous run of the split's unique images and their captions."""

    index: int
    image_ids: np.ndarray  # (n,) int64, sorted
    paths: list[str]  # as in the manifest (rejects name them)
    locations: list[str]  # resolved: what the loader opens
    captions: list[list[tuple[int, str]]]  # per image: [(sample_id, caption)] in sample_id order
    rejects: list[Reject] = field(default_factory=list)  # empty captions (recorded once, with shard 0)
    lone: list[tuple[int, str]] = field(default_factory=list)  # caption-only rows (shard 0 only)


@dataclass
class ShardOutput:
    """A shard's arrays, ready to write: only the images that were encoded, and their captions."""

    index: int
    image: np.ndarray  # (n_ok, D)
    image_id: np.ndarray  # (n_ok,)
    image_norm: np.ndarray  # (n_ok,)
    text: np.ndarray  # (n_texts, D)
    sample_id: np.ndarray  # (n_texts,)
    text_image_id: np.ndarray  # (n_texts,)
    text_norm: np.ndarray  # (n_texts,)
    rejects: list[Reject]
    image_views: np.ndarray | None = None  # (n_ok, K, D)
    view_params: np.ndarray | None = None  # (n_ok, K, 5)
    lone_text: np.ndarray | None = None  # (n_lone, D), shard 0
    lone_sample_id: np.ndarray | None = None  # (n_lone,), shard 0 (empty when the split has none)

    @property
    def texts(self) -> int:
        return len(self.sample_id) + (len(self.lone_sample_id) if self.lone_sample_id is not None else 0)


__all__ = ["ShardInput", "ShardOutput"]
