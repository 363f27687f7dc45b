"""Image-level class labels from a manifest's ``label`` column, and few-shot sampling.

A manifest row is an (image, caption) pair; classification works per image. Images whose rows carry no
label, disagree about it, or name a class absent from the training split are left out and counted.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest


@dataclass
class LabelledImages:
    """The labelled images of one split: ids (ascending), class indices, image paths and captions."""

    image_ids: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int64 index into the class list
    locations: list[str]  # resolved image locations
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> images left out

    def __len__(self) -> int:
        return len(self.image_ids)


def image_labels(manifest: Manifest) -> tuple[dict[int, str], dict[str, int], dict[int, str]]:
    """({image_id: label}, {reason: count} of images left out, {image_id: path})."""
    t = manifest.table
    labels: dict[int, set] = {}
    paths: dict[int, str] = {}
    for iid, label, path in zip(
        t.column("image_id").to_pylist(), t.column("label").to_pylist(), t.column("image_path").to_pylist()
    ):
        labels.setdefault(iid, set()).add(label)
        paths.setdefault(iid, path)
    out, skipped = {}, {"no label": 0, "conflicting labels": 0}
    for iid, found in labels.items():
        named = {x for x in found if x is not None and str(x).strip()}
        if not named:
            skipped["no label"] += 1
        elif len(named) > 1:
            skipped["conflicting labels"] += 1
        else:
            out[iid] = next(iter(named))
    return out, {k: v for k, v in skipped.items() if v}, paths


def class_list(train: Manifest) -> list[str]:
    """Sorted labels of the training split (the classifier's output order)."""
    labels, _, _ = image_labels(train)
    classes = sorted(set(labels.values()))
    if len(classes) < 2:
        raise PipelineError(
            f"the training manifest has {len(classes)} labelled class(es); classification needs "
            "at least 2 (build manifests with a label column: folder --labels-from-parent, "
            "tabular --label-col, or clipdistill emoji-labels)"
        )
    return classes


def labelled_images(manifest: Manifest, classes: list[str]) -> LabelledImages:
    labels, skipped, paths = image_labels(manifest)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [iid for iid, lab in labels.items() if lab not in index]
    if unknown:
        skipped["class not in the training split"] = len(unknown)
    ids = np.array(sorted(iid for iid, lab in labels.items() if lab in index), dtype=np.int64)
    return LabelledImages(
        image_ids=ids,
        labels=np.array([index[labels[int(i)]] for i in ids], dtype=np.int64),
        locations=[manifest.resolve(paths[int(i)]) for i in ids],
        skipped=skipped,
    )


def sample_few_shot(image_ids: np.ndarray, labels: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, dict]:
    """Positions of k images per class (all of a class's images when it has fewer), deterministically.

    Each image's rank within its class is a hash of (seed, image_id), so the choice does not depend on the
    order of the input or on the other classes. Returns (sorted positions, {class index: images taken}
    for classes that had fewer than k).
    """
    if k < 1:
        raise PipelineError(f"few-shot k must be >= 1, got {k}")
    image_ids = np.asarray(image_ids, dtype=np.int64)
    keys = np.array([zlib.crc32(f"{seed}:{int(i)}".encode()) for i in image_ids], dtype=np.int64)
    chosen, short = [], {}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = members[np.lexsort((image_ids[members], keys[members]))]
        chosen.append(order[:k])
        if len(members) < k:
            short[int(c)] = int(len(members))
    return np.sort(np.concatenate(chosen)), short


__all__ = ["LabelledImages", "image_labels", "class_list", "labelled_images", "sample_few_shot"]
