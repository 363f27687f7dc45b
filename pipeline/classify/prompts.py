"""Class-prompt embeddings next to the token cache (the head's queries in prompts mode), per class list x templates:

    prompts-<digest>.h5        class-prompt embeddings (K, D), with checksums like every cache file

The token split files themselves (format, writer, reader) live with the other caches in
``pipeline.features.cache.tokens``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.common import io
from pipeline.common.errors import PipelineError
from pipeline.features.cache.integrity import check_file, checksum_attrs
from pipeline.features.cache.tokens import FORMAT
from pipeline.features.encode import encode_captions
from pipeline.teachers.base import Teacher


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
    check_file(path, "class-prompt file", "delete it and rerun teacher-tokens")
    try:
        with h5py.File(path, "r") as f:
            fingerprint = f.attrs["teacher_fingerprint"]
            emb = f["embedding"][()]
    except (OSError, KeyError) as exc:  # unchecked (trusted) files may be anything
        raise PipelineError(f"cannot read class-prompt file {path}: {exc}") from None
    if expect_fingerprint is not None and fingerprint != expect_fingerprint:
        raise PipelineError(f"{path} was made by teacher {fingerprint}, expected {expect_fingerprint}")
    return emb


def check_templates(templates: list[str]) -> list[str]:
    if not templates:
        raise PipelineError("give at least one class-prompt template, e.g. 'a photo of a {label}.'")
    for t in templates:
        if "{label}" not in t:
            raise PipelineError(f"prompt template {t!r} has no {{label}} placeholder")
    return list(templates)


def cache_prompts(teacher: Teacher, classes: list[str], templates: list[str], out_dir: str | Path) -> Path:
    """(K, D) class-prompt embeddings: each template's embedding, averaged over templates, re-normalised."""
    templates = check_templates(templates)
    path = prompts_path(Path(out_dir), classes, templates)
    if path.exists():
        return path
    per_template = [encode_captions(teacher, [t.format(label=c) for c in classes]) for t in templates]
    emb = F.normalize(torch.from_numpy(np.mean(per_template, axis=0)), dim=-1).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_prompts(path, emb, classes, templates, teacher.fingerprint())


__all__ = ["prompts_path", "write_prompts", "read_prompts", "check_templates", "cache_prompts"]
