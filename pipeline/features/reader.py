"""Stage 1's reader: a split's manifest cut into shards of ``shard_size`` unique images (sorted by image_id),
each with its captions. Pure bookkeeping over the manifest; images are opened by the mapper's loader."""

from __future__ import annotations

import math

from pipeline.data.manifest import Manifest, Reject
from pipeline.features.shard import ShardInput


def captions_by_image(manifest: Manifest) -> tuple[dict[int, list[tuple[int, str]]], list[Reject],
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


class SplitReader:
    """The shard plan of one split: ``total`` shards; ``read(s)`` is shard s's images and captions."""

    def __init__(self, manifest: Manifest, shard_size: int):
        self.manifest = manifest
        self.shard_size = shard_size
        self.image_ids, self.paths = manifest.unique_images()
        self.captions, self.caption_rejects, self.lone = captions_by_image(manifest)
        self.total = max(1, math.ceil(len(self.image_ids) / shard_size))

    def _range(self, s: int) -> range:
        return range(s * self.shard_size, min((s + 1) * self.shard_size, len(self.image_ids)))

    def read(self, s: int) -> ShardInput:
        idx = self._range(s)
        ids = self.image_ids[list(idx)]
        paths = [self.paths[i] for i in idx]
        return ShardInput(
            index=s, image_ids=ids, paths=paths, locations=[self.manifest.resolve(p) for p in paths],
            captions=[self.captions.get(int(i), []) for i in ids],
            rejects=list(self.caption_rejects) if s == 0 else [],  # recorded once, with shard 0
            lone=list(self.lone) if s == 0 else [],  # caption-only rows are written with shard 0
        )

    def work(self, s: int, views: int = 0) -> int:
        """Progress items of shard ``s``: each image once plus its views, its captions, shard 0's lone texts."""
        idx = self._range(s)
        return ((1 + views) * len(idx) + sum(len(self.captions.get(int(self.image_ids[i]), ())) for i in idx)
                + (len(self.lone) if s == 0 else 0))


__all__ = ["SplitReader", "captions_by_image"]
