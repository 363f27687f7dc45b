"""An image folder with caption sidecars: ``dir/img.jpg`` + ``dir/img.txt`` (one caption per line).

Ids follow the sorted relative image paths: ``image_id`` is the image's index among all images
found (with or without a caption file, so adding a sidecar does not renumber other images) and
``sample_id`` counts the non-blank caption lines in that order. Hidden files and folders are skipped.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Mapping

from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest, Reject
from pipeline.data.readers.common import (
    number_unpaired,
    IMAGE_EXTENSIONS,
    assign_split,
    describe_source,
    parse_split_fractions,
    require_dir,
)


def read_folder(
    path: str | Path,
    labels_from_parent: bool = False,
    split_fractions: str | Mapping[str, float] | None = None,
    unpaired: bool = False,
) -> Manifest:
    """Read an image folder with ``.txt`` caption sidecars (searched recursively).

    Args:
        path: the folder; it is also the manifest's image root.
        labels_from_parent: label each image with its parent folder's name (ImageFolder layout,
            ``root/<class>/img.jpg``); images directly in the root are then rejected.
        split_fractions: hash-based split assignment on the relative image path; default all ``train``.
        unpaired: an image without a caption file becomes a declared image-only row (transfer data) instead
            of a reject; a folder of images without any sidecar is then a valid dataset.

    Returns:
        Manifest; ``source_row`` is ``relative/img.txt:LINE``. Images without a caption file, caption
        files without an image, unreadable caption files and ambiguous sidecars are rejects.
    """
    root = require_dir(path, "image folder")
    fractions = parse_split_fractions(split_fractions)
    images: list[str] = []
    sidecars: set[str] = set()
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        suffix = p.suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            images.append(rel.as_posix())
        elif suffix == ".txt":
            sidecars.add(rel.as_posix())
    images.sort()
    if not images and not sidecars:
        raise PipelineError(f"no images or caption files found under {root}")

    # Two images with one stem (x.jpg, x.png) would share x.txt: which one it describes is unknown.
    users: dict[str, list[str]] = defaultdict(list)
    for rel in images:
        users[_sidecar_of(rel)].append(rel)

    rows: list[dict] = []
    rejects: list[Reject] = []
    sample_id = 0
    for image_id, rel in enumerate(images):
        txt = _sidecar_of(rel)
        if txt not in sidecars:
            if unpaired and labels_from_parent and Path(rel).parent == Path("."):
                rejects.append(Reject(rel, "image is not inside a class folder", rel))
            elif unpaired:  # sample ids stay those of the captioned rows: image-only rows number after them
                rows.append({"image_id": image_id, "image_path": rel, "caption": None, "unpaired": True,
                             "split": assign_split(rel, fractions),
                             "label": Path(rel).parent.name if labels_from_parent else None, "source_row": rel})
            else:
                rejects.append(Reject(rel, f"no caption file ({Path(txt).name})", rel))
            continue
        if len(users[txt]) > 1:
            rejects.append(Reject(txt, f"ambiguous caption file: {txt} matches {users[txt]}", rel))
            continue
        try:
            text = (root / txt).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            rejects.append(Reject(txt, "caption file is not valid UTF-8", rel))
            continue
        except OSError as exc:
            rejects.append(Reject(txt, f"cannot read caption file: {exc.strerror or exc}", rel))
            continue
        captions = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        if not captions:
            rejects.append(Reject(txt, "empty caption", rel, text))
            continue
        label = None
        if labels_from_parent:
            parent = Path(rel).parent
            if parent == Path("."):
                reason = "image is not inside a class folder"
                rejects.extend(Reject(f"{txt}:{n}", reason, rel, c) for n, c in captions)
                sample_id += len(captions)
                continue
            label = parent.name
        split = assign_split(rel, fractions)
        for n, caption in captions:
            rows.append(
                {
                    "sample_id": sample_id,
                    "image_id": image_id,
                    "image_path": rel,
                    "caption": caption,
                    "split": split,
                    "label": label,
                    "source_row": f"{txt}:{n}",
                }
            )
            sample_id += 1

    for txt in sorted(sidecars - users.keys()):
        rejects.append(Reject(txt, "image file not found (caption file without an image)"))
    number_unpaired(rows, sample_id)
    options: dict[str, object] = {"labels_from_parent": labels_from_parent}
    if unpaired:
        options["unpaired"] = True
    if fractions:
        options["split_fractions"] = fractions
    source = describe_source("folder", root, **options)
    return Manifest.from_rows(rows, source=source, image_root=root, rejects=rejects)


def _sidecar_of(image_rel: str) -> str:
    return Path(image_rel).with_suffix(".txt").as_posix()
