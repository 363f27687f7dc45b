"""Class-prompt embeddings next to the token cache, and the token cache's names for the classify stage.

The token split files themselves (format, ``TokenWriter``, ``TokenSplit``) live with the other caches in
``pipeline.features.cache.tokens``; this module re-exports them and stores, per class list x template list:

    prompts-<digest>.h5        class-prompt embeddings (K, D), with checksums like every cache file
    summary.json               sizes of everything in the token folder (written by teacher-tokens)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from pipeline.common import io
from pipeline.common.errors import PipelineError
from pipeline.features.cache.integrity import checksum_attrs
from pipeline.features.cache.tokens import FORMAT, TokenMeta, TokenSplit, TokenWriter, images_digest, split_path


def prompts_digest(classes: list[str], templates: list[str]) -> str:
    return hashlib.sha256(json.dumps([classes, templates]).encode()).hexdigest()[:12]


def prompts_path(directory: Path, classes: list[str], templates: list[str]) -> Path:
    return Path(directory) / f"prompts-{prompts_digest(classes, templates)}.h5"


def write_prompts(
    path: Path, embedding: np.ndarray, classes: list[str], templates: list[str], teacher_fingerprint: str
) -> Path:
    arrays = {"embedding": np.asarray(embedding, dtype=np.float32)}
    with io.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("embedding", data=arrays["embedding"])
        f.attrs.update(checksum_attrs(arrays))
        f.attrs.update(
            classes=json.dumps(classes),
            templates=json.dumps(templates),
            teacher_fingerprint=teacher_fingerprint,
            format=FORMAT,
        )
    return path


def read_prompts(
    directory: Path, classes: list[str], templates: list[str], expect_fingerprint: str | None = None
) -> np.ndarray:
    """(K, D) prompt embeddings for exactly this class list and these templates."""
    path = prompts_path(directory, classes, templates)
    if not path.is_file():
        raise PipelineError(
            f"no class-prompt embeddings for these {len(classes)} classes and templates in "
            f"{directory}; run `clipdistill teacher-tokens` with the same config"
        )
    with h5py.File(path, "r") as f:
        fingerprint = f.attrs["teacher_fingerprint"]
        emb = f["embedding"][()]
    if expect_fingerprint is not None and fingerprint != expect_fingerprint:
        raise PipelineError(f"{path} was made by teacher {fingerprint}, expected {expect_fingerprint}")
    return emb


__all__ = [
    "TokenMeta",
    "TokenWriter",
    "TokenSplit",
    "images_digest",
    "split_path",
    "prompts_path",
    "write_prompts",
    "read_prompts",
    "FORMAT",
]
