"""Webdataset-style tar shards: members grouped into samples by key (``000123.jpg`` + ``000123.txt``).

A member's key is its name up to the first dot of its base name (``a/000123.seg.png`` -> key
``a/000123``, extension ``seg.png``), as webdataset groups them. Captions come from the sample's
``.json`` (a ``captions`` list, else a ``caption`` string) and otherwise from its ``.txt`` (the whole
file is one caption, the img2dataset convention). A ``label`` field in the json becomes the label.

Ids: shards are taken in sorted relative-path order and keys in sorted order within a shard;
``image_id`` numbers every key in that order (also keys that are rejected, so fixing one sample does
not renumber the rest) and ``sample_id`` numbers the captions. With ``unpaired``, a sample with an image and
no caption is a declared image-only row (a large unlabelled image set is usually shards of images alone); its
sample id comes after every caption's, so declaring them never renumbers a pair. Only member headers and the
small json/txt members are read; images are decoded later, in stage 1.
"""

from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Mapping

from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest, Reject
from pipeline.data.readers.common import (
    assign_split, describe_source, number_unpaired, parse_split_fractions, relative_to_root,
)

# Preference order when a sample has several image members.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def read_webdataset(path: str | Path, split_fractions: str | Mapping[str, float] | None = None,
                    unpaired: bool = False) -> Manifest:
    """Read tar shards.

    Args:
        path: a folder (every ``*.tar`` below it is a shard) or a single ``.tar`` file. The folder
            (or the file's folder) is the manifest's image root; image paths are ``shard.tar::member``.
        split_fractions: hash-based split assignment on ``shard::key``; default all ``train``.
        unpaired: a sample with an image and no caption becomes a declared image-only row (transfer data)
            instead of a reject.

    Returns:
        Manifest; ``source_row`` is ``shard.tar:key``. Samples without an image or caption, with a
        malformed json or non-string captions are rejects; an unreadable shard is one reject.
    """
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        root, shards = path, sorted(path.rglob("*.tar"), key=lambda p: p.relative_to(path).as_posix())
        if not shards:
            raise PipelineError(f"no .tar shards found under {path}")
    elif path.is_file():
        root, shards = path.parent, [path]
    else:
        raise PipelineError(f"webdataset shards not found: {path}")
    fractions = parse_split_fractions(split_fractions)

    rows: list[dict] = []
    rejects: list[Reject] = []
    unreadable: list[str] = []
    image_id = sample_id = 0
    for shard in shards:
        shard_rel = relative_to_root(shard, root)
        try:
            samples = _read_shard(shard)
        except (OSError, tarfile.TarError, EOFError) as exc:
            unreadable.append(f"{shard_rel}: {exc}")
            rejects.append(Reject(shard_rel, f"cannot read tar shard: {exc}"))
            continue
        for key in sorted(samples):
            for sample in _sample_rows(samples[key], f"{shard_rel}:{key}", shard_rel, rejects, unpaired):
                sample.update(image_id=image_id, split=assign_split(f"{shard_rel}::{key}", fractions))
                rows.append(sample)
                if not sample.get("unpaired"):
                    sample["sample_id"] = sample_id
                    sample_id += 1
            image_id += 1
    if len(unreadable) == len(shards):
        raise PipelineError(f"no readable tar shard under {path} ({unreadable[0]})")
    number_unpaired(rows, sample_id)
    options: dict[str, object] = {"split_fractions": fractions} if fractions else {}
    if unpaired:
        options["unpaired"] = True
    source = describe_source("webdataset", path, **options)
    return Manifest.from_rows(rows, source=source, image_root=root, rejects=rejects)


class _Sample:
    """Members of one key: image member names by extension, caption payloads, problems found."""

    def __init__(self) -> None:
        self.images: dict[str, str] = {}
        self.text: dict[str, bytes] = {}  # "txt" / "json" -> raw bytes
        self.problems: list[str] = []


def _read_shard(shard: Path) -> dict[str, _Sample]:
    samples: dict[str, _Sample] = defaultdict(_Sample)
    with tarfile.open(shard) as tf:
        seen: set[str] = set()
        for member in tf.getmembers():
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            key = f"{folder}/{stem}" if folder else stem
            sample = samples[key]
            if member.name in seen:
                sample.problems.append(f"duplicate member {member.name}")
                continue
            seen.add(member.name)
            if not dot:
                sample.problems.append(f"member {member.name} has no extension")
                continue
            ext = ext.lower()
            if ext in IMAGE_EXTS:
                sample.images[ext] = member.name
            elif ext in ("txt", "json"):
                sample.text[ext] = tf.extractfile(member).read()
    return samples


def _sample_rows(sample: _Sample, where: str, shard_rel: str, rejects: list[Reject], unpaired: bool = False
                 ) -> list[dict]:
    """Rows for one sample (without ids and split), recording its rejects."""
    image = next((sample.images[e] for e in IMAGE_EXTS if e in sample.images), None)
    image_path = f"{shard_rel}::{image}" if image else None

    def reject(reason: str, caption: str | None = None) -> list[dict]:
        rejects.append(Reject(where, reason, image_path, caption))
        return []

    if sample.problems:
        return reject("; ".join(sample.problems))
    captions: list[object] = []
    label = None
    if "json" in sample.text:
        try:
            meta = json.loads(sample.text["json"].decode("utf-8"))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            return reject(f"malformed json member: {exc}")
        if not isinstance(meta, dict):
            return reject("malformed json member: not a JSON object")
        if "captions" in meta:
            if not isinstance(meta["captions"], list):
                return reject("malformed json member: 'captions' is not a list")
            captions = list(meta["captions"])
        elif "caption" in meta:
            captions = [meta["caption"]]
        if meta.get("label") is not None:
            label = str(meta["label"])
    if not captions and "txt" in sample.text:
        try:
            captions = [sample.text["txt"].decode("utf-8-sig")]
        except UnicodeDecodeError:
            return reject("txt member is not valid UTF-8")
    if image is None:
        first = captions[0] if captions and isinstance(captions[0], str) else None
        return reject("image file not found (no image member for this key)", first)
    if not captions and unpaired:
        return [{"image_path": image_path, "caption": None, "unpaired": True, "label": label, "source_row": where}]
    if not captions:
        return reject("no caption (.txt member or json 'caption'/'captions')")
    rows = []
    for i, caption in enumerate(captions):
        row_where = f"{where}:captions[{i}]" if len(captions) > 1 else where
        if caption is not None and not isinstance(caption, str):
            reason = f"caption is not a string ({type(caption).__name__})"
            rejects.append(Reject(row_where, reason, image_path))
            continue
        rows.append({"image_path": image_path, "caption": caption, "label": label, "source_row": row_where})
    return rows
