"""COCO caption annotation files (``captions_train2017.json``-style); one file is one split.

Ids: ``sample_id`` is the annotation ``id`` and ``image_id`` the COCO image ``id``, so rows can be
joined back to the official annotations. With ``unpaired`` an image no annotation names is a declared
image-only row instead of a reject; its sample id follows the largest annotation id, so no pair is renumbered.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest, Reject
from pipeline.data.readers.common import (
    ImageIdRegistry,
    ImageLocator,
    as_int_id,
    describe_source,
    load_json_file,
    require_dir,
    require_file,
)


def read_coco(path: str | Path, image_root: str | Path | None = None, split: str = "train",
              unpaired: bool = False) -> Manifest:
    """Read a COCO captions JSON.

    Args:
        path: the annotation file:
            ``{"images": [{id, file_name}], "annotations": [{id, image_id, caption}]}``.
        image_root: folder holding the ``file_name`` images (e.g. ``train2017/``); defaults to the
            JSON file's folder.
        split: split name given to every row.
        unpaired: keep images without any annotation as image-only rows (transfer data).

    Returns:
        Manifest with one row per annotation, in file order. Annotations of unknown or malformed
        images, missing image files and malformed annotations are rejects
        (``source_row`` like ``captions_val2017.json:annotations[12]``).
    """
    path = require_file(path, "COCO captions file")
    root = require_dir(image_root, "image root") if image_root is not None else path.parent
    if not isinstance(split, str) or not split.strip():
        raise PipelineError(f"COCO split name must be a non-empty string, got {split!r}")
    data = load_json_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PipelineError(f"{path} is not a COCO captions file: no top-level 'images' list")
    if not isinstance(data.get("annotations"), list):
        raise PipelineError(f"{path} is not a COCO captions file: no top-level 'annotations' list")

    rejects: list[Reject] = []
    # image id -> relative path, or the reason every caption of that image is rejected
    image_path: dict[int, str] = {}
    image_problem: dict[int, str] = {}
    image_where: dict[int, str] = {}
    ids = ImageIdRegistry()
    locator = ImageLocator(root)
    for i, img in enumerate(data["images"]):
        where = f"{path.name}:images[{i}]"
        image_id = as_int_id(img.get("id")) if isinstance(img, dict) else None
        name = img.get("file_name") if isinstance(img, dict) else None
        if image_id is None or not isinstance(name, str) or not name.strip():
            # Its annotations then show up as "unknown image_id" rejects, so nothing is lost silently.
            rejects.append(Reject(where, "malformed image entry: needs integer 'id' and 'file_name'"))
            continue
        rel = locator.relative(name)
        image_where.setdefault(image_id, where)
        conflict = ids.claim(image_id, rel)
        if conflict:
            image_problem[image_id] = conflict
            continue
        image_path[image_id] = rel
        if not locator.exists(rel):
            image_problem[image_id] = locator.missing_reason(rel)

    rows: list[dict] = []
    captioned: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        where = f"{path.name}:annotations[{i}]"
        if not isinstance(ann, dict):
            rejects.append(Reject(where, "malformed annotation: not a JSON object"))
            continue
        image_id = as_int_id(ann.get("image_id"))
        captioned.add(image_id)
        caption = ann.get("caption")
        rel = image_path.get(image_id) if image_id is not None else None
        text = caption if isinstance(caption, str) else None
        problem = None
        if as_int_id(ann.get("id")) is None:
            problem = "malformed annotation: missing or non-integer 'id'"
        elif image_id is None:
            problem = "malformed annotation: missing or non-integer 'image_id'"
        elif image_id in image_problem:
            problem = image_problem[image_id]
        elif rel is None:
            problem = f"unknown image_id {image_id}"
        elif caption is not None and not isinstance(caption, str):
            problem = f"caption is not a string ({type(caption).__name__})"
        if problem:
            rejects.append(Reject(where, problem, rel, text))
            continue
        rows.append(
            {
                "sample_id": as_int_id(ann["id"]),
                "image_id": image_id,
                "image_path": rel,
                "caption": text,
                "split": split,
                "label": None,
                "source_row": where,
            }
        )
    # An image nobody captioned would otherwise vanish without a trace.
    next_id = 1 + max((i for a in data["annotations"] if isinstance(a, dict)
                       for i in [as_int_id(a.get("id"))] if i is not None), default=-1)
    for image_id, where in image_where.items():  # file order
        if image_id in captioned:
            continue
        if unpaired and image_id not in image_problem:
            rows.append({"sample_id": next_id, "image_id": image_id, "image_path": image_path[image_id],
                         "caption": None, "unpaired": True, "split": split, "label": None, "source_row": where})
            next_id += 1
        else:
            reason = image_problem.get(image_id, "image has no captions") if unpaired else "image has no captions"
            rejects.append(Reject(where, reason, image_path.get(image_id)))
    options = {"unpaired": True} if unpaired else {}
    source = describe_source("coco", path, image_root=root, split=split, **options)
    return Manifest.from_rows(rows, source=source, image_root=root, rejects=rejects)
