"""Dataset readers: turn the formats users have into a ``pipeline.data.manifest.Manifest``.

Every reader checks that image files exist (without decoding them; that is stage 1's job), records
bad rows as rejects with a reason and a ``source_row``, and raises ``PipelineError`` only when the
input as a whole cannot be used (missing or unparsable file, missing required column).
"""

from __future__ import annotations

import inspect
from typing import Callable

from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest
from pipeline.data.readers.captions import read_captions
from pipeline.data.readers.coco import read_coco
from pipeline.data.readers.folder import read_folder
from pipeline.data.readers.karpathy import read_karpathy
from pipeline.data.readers.tabular import read_tabular
from pipeline.data.readers.webdataset import read_webdataset

READERS: dict[str, Callable[..., Manifest]] = {
    "karpathy": read_karpathy,
    "coco": read_coco,
    "tabular": read_tabular,
    "folder": read_folder,
    "webdataset": read_webdataset,
    "captions": read_captions,
}

FORMATS: dict[str, str] = {
    "karpathy": "Karpathy split JSON (dataset_flickr30k.json, dataset_coco.json) + image folder",
    "coco": "COCO captions JSON (captions_train2017.json) + image folder; one file is one split",
    "tabular": "CSV / TSV / parquet table with image-path and caption columns (one row per caption)",
    "folder": "image folder with img.txt caption sidecars (one caption per line), optional class folders",
    "webdataset": "webdataset tar shards: key.jpg + key.txt and/or key.json with caption(s)",
    "captions": "a text file of captions without images, one per line (caption-only rows: transfer data)",
}


def read_dataset(fmt: str, **options: object) -> Manifest:
    """Read a dataset with the reader for ``fmt`` (a key of ``FORMATS``).

    ``options`` are that reader's keyword arguments (``path`` first); an unknown format or an option
    the reader does not take is a one-line ``PipelineError``.
    """
    reader = READERS.get(fmt)
    if reader is None:
        raise PipelineError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    params = inspect.signature(reader).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise PipelineError(f"format {fmt!r} does not take option(s) {unknown}; it takes {list(params)}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in options]
    if missing:
        raise PipelineError(f"format {fmt!r} needs option(s) {missing}")
    return reader(**options)


__all__ = ["FORMATS", "READERS", "read_dataset", "read_captions", "read_coco", "read_folder", "read_karpathy", "read_tabular",
           "read_webdataset"]
