"""Classification datasets without captions: an ImageFolder layout (``root/<class>/img.png``, optionally
under ``root/<split>/``), e.g. a CIFAR or ImageNet export.

Each image becomes one manifest row whose caption is its class name (manifests need a caption; the
representation head then uses class prompts, and captions mode refuses such captions). For CSV/parquet
tables with a label column use ``clipdistill build-manifest tabular ... --label-col L --caption-col C``
(a caption column, or the label column again when there is none).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest, Reject
from pipeline.data.readers.common import IMAGE_EXTENSIONS, assign_split, parse_split_fractions, require_dir

SPLIT_NAMES = ("train", "val", "test")
CAPTIONS_ARE_LABELS = "captions=class names"


def _id(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def read_class_folder(path: str | Path, split_fractions: str | None = None) -> Manifest:
    """Read ``root/<class>/*`` or ``root/<split>/<class>/*`` (split in train/val/test) into a manifest."""
    root = require_dir(path, "image folder")
    fractions = parse_split_fractions(split_fractions)
    tops = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    by_split = bool(tops) and all(t in SPLIT_NAMES for t in tops)
    if by_split and fractions:
        raise PipelineError(f"{root} already has split folders ({tops}); do not give split fractions")
    rows, rejects = [], []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        parts = rel.parts
        depth = 3 if by_split else 2
        if len(parts) != depth:
            rejects.append(
                Reject(
                    rel.as_posix(), f"not at <{'split/' if by_split else ''}class>/<image>", rel.as_posix()
                )
            )
            continue
        label = parts[-2]
        split = parts[0] if by_split else assign_split(rel.as_posix(), fractions)
        iid = _id(rel.as_posix())
        rows.append(
            {
                "sample_id": iid,
                "image_id": iid,
                "image_path": rel.as_posix(),
                "split": split,
                "caption": label.replace("_", " "),
                "label": label,
                "source_row": rel.as_posix(),
            }
        )
    if not rows:
        raise PipelineError(f"no images under {root} in <class>/<image> folders")
    return Manifest.from_rows(
        rows, source=f"class folder {root} ({CAPTIONS_ARE_LABELS})", image_root=root, rejects=rejects
    )


__all__ = ["read_class_folder", "CAPTIONS_ARE_LABELS"]
