"""On-disk layout of one cache (one dataset x teacher x split directory).

    <dir>/shard-00000-of-00004.h5           complete shard (written as .tmp, then renamed)
    <dir>/shard-00000-of-00004.rejects.parquet   images that failed to decode in that shard
    <dir>/summary.json                      written when every shard of the split exists

A shard holds a contiguous run of the split's unique images (sorted by image_id) and every
caption of those images. Datasets (all contiguous, uncompressed, so they can be memory-mapped):
    image          (n_images, D)  float16|float32   L2-normalised teacher image embeddings
    image_id       (n_images,)    int64
    text           (n_texts, D)   float16|float32   L2-normalised teacher text embeddings
    sample_id      (n_texts,)     int64             manifest row of each caption
    text_image_id  (n_texts,)     int64             image of each caption
    image_norm     (n_images,)    float32           optional: norm of each image embedding before normalising
    text_norm      (n_texts,)     float32           optional: same for texts
    image_views    (n_images, K, D) float16|float32 optional (--views K): the teacher's embeddings of K augmented
                                                    views of each image (features/views.py)
    view_params    (n_images, K, 5) float32         the views' crop boxes (fractions) and flip flags
    lone_text      (n_lone, D)    float16|float32   shard 0 only, when the split has caption-only rows: their
    lone_sample_id (n_lone,)      int64             teacher text embeddings and manifest rows
Attributes: see CacheMeta.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

FORMAT_VERSION = 1
TOKEN_FORMAT = "clipdistill-tokens/1"  # the classification token cache (cache/tokens.py): one file per split
TARGETS_FORMAT = "clipdistill-targets/1"  # classification soft targets (classify.teacher_training), checked alike
SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.h5$")


def shard_name(index: int, total: int) -> str:
    return f"shard-{index:05d}-of-{total:05d}.h5"


@dataclass(frozen=True)
class CacheMeta:
    """Attributes stored on every shard; a reader checks they agree across shards."""

    teacher_fingerprint: str
    teacher_name: str
    width: int
    dtype: str  # "float16" or "float32"
    manifest_hash: str
    dataset: str
    split: str
    shard_size: int  # unique images per shard
    total_shards: int
    normalised: bool = True
    views: int = 0  # cached augmented views per image (0: none)
    view_spec: str = ""  # ViewSpec as JSON (how the views were drawn)
    format_version: int = FORMAT_VERSION
    package_version: str = ""

    def to_attrs(self) -> dict:
        return asdict(self)

    @classmethod
    def from_attrs(cls, attrs) -> "CacheMeta":
        fields = cls.__dataclass_fields__
        values = {k: attrs[k] for k in fields if k in attrs}
        for k, v in values.items():  # h5py returns numpy scalars
            values[k] = v.item() if hasattr(v, "item") else v
        return cls(**values)
