"""Write one cache shard atomically (temporary name, then rename) with contiguous datasets."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pipeline.features.cache.format import CacheMeta
from pipeline.features.cache.integrity import checksum_attrs, stamp_path
from pipeline.common import io


def write_shard(
    path: str | Path,
    meta: CacheMeta,
    image: np.ndarray,
    image_id: np.ndarray,
    text: np.ndarray,
    sample_id: np.ndarray,
    text_image_id: np.ndarray,
    image_norm: np.ndarray | None = None,
    text_norm: np.ndarray | None = None,
    image_views: np.ndarray | None = None,
    view_params: np.ndarray | None = None,
    lone_text: np.ndarray | None = None,
    lone_sample_id: np.ndarray | None = None,
) -> Path:
    """Write a complete shard. A crash leaves only a ``*.h5.<pid>.tmp``, which a rerun removes.

    ``image_norm`` / ``text_norm``: the teacher's embedding norms before L2 normalisation (optional), so
    training can also use un-normalised targets (``data.teacher_normalized: false``).
    """
    path = Path(path)
    dtype = np.dtype(meta.dtype)
    # fsync: make the data durable before the rename publishes it
    arrays = {
        "image": np.ascontiguousarray(image, dtype=dtype).reshape(-1, meta.width),
        "text": np.ascontiguousarray(text, dtype=dtype).reshape(-1, meta.width),
        "image_id": np.asarray(image_id, dtype=np.int64),
        "sample_id": np.asarray(sample_id, dtype=np.int64),
        "text_image_id": np.asarray(text_image_id, dtype=np.int64),
    }
    for name, norms in (("image_norm", image_norm), ("text_norm", text_norm)):
        if norms is not None:
            arrays[name] = np.asarray(norms, dtype=np.float32)
    if lone_sample_id is not None and len(lone_sample_id):  # captions without an image (caption-only rows)
        arrays["lone_text"] = np.ascontiguousarray(lone_text, dtype=dtype).reshape(-1, meta.width)
        arrays["lone_sample_id"] = np.asarray(lone_sample_id, dtype=np.int64)
    if meta.views:
        arrays["image_views"] = np.ascontiguousarray(image_views, dtype=dtype).reshape(-1, meta.views, meta.width)
        arrays["view_params"] = np.asarray(view_params, dtype=np.float32).reshape(-1, meta.views, 5)
    with io.atomic_path(path, fsync=True) as tmp, h5py.File(tmp, "w") as f:
        for name, array in arrays.items():
            # No chunks/compression: contiguous storage is what makes np.memmap reads possible.
            f.create_dataset(name, data=array)
        f.attrs.update(meta.to_attrs())
        f.attrs.update(checksum_attrs(arrays))  # of what was meant to be written: a reader compares
    stamp_path(path).unlink(missing_ok=True)  # a rewritten shard is new here: the next open checks it in full
    return path
