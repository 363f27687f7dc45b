"""Karpathy split files (``dataset_flickr30k.json``, ``dataset_coco.json``, ``dataset_flickr8k.json``).

Ids: ``sample_id`` is the sentence's ``sentid`` and ``image_id`` is the entry's ``imgid``. Both are
present in every Karpathy file and unique across the whole file (all splits). ``cocoid`` is only in
the COCO file, so it is not used: one id scheme for every Karpathy dataset, and ids agree with
other tools that index these files by ``imgid``/``sentid``. With ``unpaired`` an image with an empty
``sentences`` list is a declared image-only row (its sample id follows the largest ``sentid``) instead of a reject.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest, Reject
from pipeline.data.readers.common import (
    number_unpaired,
    ImageIdRegistry,
    ImageLocator,
    as_int_id,
    describe_source,
    load_json_file,
    require_dir,
    require_file,
)


def read_karpathy(
    path: str | Path,
    image_root: str | Path | None = None,
    restval_to_train: bool = False,
    unpaired: bool = False,
) -> Manifest:
    """Read a Karpathy split JSON.

    Args:
        path: the ``dataset_*.json`` file.
        image_root: folder the images live under; an entry's image is
            ``image_root/filepath/filename`` (``filepath`` only in the COCO file, e.g. ``val2014``).
            Defaults to the JSON file's folder.
        restval_to_train: fold the ``restval`` split into ``train`` (the usual 113k COCO train set).
        unpaired: keep images without sentences as image-only rows (transfer data).

    Returns:
        Manifest with one row per sentence; malformed entries, missing images and id conflicts
        are recorded as rejects with ``source_row`` like ``dataset_coco.json:images[17].sentences[2]``.
    """
    path = require_file(path, "Karpathy split file")
    root = require_dir(image_root, "image root") if image_root is not None else path.parent
    data = load_json_file(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise PipelineError(f"{path} is not a Karpathy split file: no top-level 'images' list")

    rows: list[dict] = []
    rejects: list[Reject] = []
    ids = ImageIdRegistry()
    locator = ImageLocator(root)
    for i, entry in enumerate(images):
        where = f"{path.name}:images[{i}]"
        problem = _entry_problem(entry)
        if problem:
            name = entry.get("filename") if isinstance(entry, dict) else None
            name = name if isinstance(name, str) else None
            rejects.append(Reject(where, f"malformed image entry: {problem}", name))
            continue
        subdir = entry.get("filepath") or ""
        rel_path = locator.relative(os.path.join(subdir, entry["filename"]))
        image_id = as_int_id(entry["imgid"])
        split = entry["split"]
        if restval_to_train and split == "restval":
            split = "train"
        image_problem = ids.claim(image_id, rel_path)
        if image_problem is None and not locator.exists(rel_path):
            image_problem = locator.missing_reason(rel_path)
        if not entry["sentences"] and unpaired and not image_problem:
            rows.append({"image_id": image_id, "image_path": rel_path, "caption": None, "unpaired": True,
                         "split": split, "label": None, "source_row": where})  # sample id below
        elif not entry["sentences"]:
            rejects.append(Reject(where, image_problem if unpaired else "image has no sentences", rel_path))
        for j, sent in enumerate(entry["sentences"]):
            swhere = f"{where}.sentences[{j}]"
            raw = sent.get("raw") if isinstance(sent, dict) else None
            caption = raw if isinstance(raw, str) else None
            if image_problem:
                rejects.append(Reject(swhere, image_problem, rel_path, caption))
                continue
            sent_problem = _sentence_problem(sent)
            if sent_problem:
                rejects.append(Reject(swhere, sent_problem, rel_path, caption))
                continue
            rows.append(
                {
                    "sample_id": as_int_id(sent["sentid"]),
                    "image_id": image_id,
                    "image_path": rel_path,
                    "caption": caption,
                    "split": split,
                    "label": None,
                    "source_row": swhere,
                }
            )
    sentids = (as_int_id(sent.get("sentid")) for e in images if isinstance(e, dict)
               and isinstance(e.get("sentences"), list) for sent in e["sentences"] if isinstance(sent, dict))
    number_unpaired(rows, 1 + max((i for i in sentids if i is not None), default=-1))  # above every sentid
    options = {"unpaired": True} if unpaired else {}
    source = describe_source("karpathy", path, image_root=root, restval_to_train=restval_to_train, **options)
    return Manifest.from_rows(rows, source=source, image_root=root, rejects=rejects)


def _entry_problem(entry: object) -> str | None:
    if not isinstance(entry, dict):
        return "not a JSON object"
    if not isinstance(entry.get("filename"), str) or not entry["filename"].strip():
        return "missing 'filename'"
    if "filepath" in entry and entry["filepath"] is not None and not isinstance(entry["filepath"], str):
        return "'filepath' is not a string"
    if as_int_id(entry.get("imgid")) is None:
        return "missing or non-integer 'imgid'"
    if not isinstance(entry.get("split"), str) or not entry["split"].strip():
        return "missing 'split'"
    if not isinstance(entry.get("sentences"), list):
        return "missing 'sentences' list"
    return None


def _sentence_problem(sent: object) -> str | None:
    if not isinstance(sent, dict):
        return "malformed sentence: not a JSON object"
    if "raw" not in sent:
        return "malformed sentence: missing 'raw'"
    if sent["raw"] is not None and not isinstance(sent["raw"], str):
        return f"caption is not a string ({type(sent['raw']).__name__})"
    if as_int_id(sent.get("sentid")) is None:
        return "malformed sentence: missing or non-integer 'sentid'"
    return None
