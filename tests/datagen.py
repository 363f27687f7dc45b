"""Tiny generated datasets in every supported manifest format, for tests.

Each ``make_*`` writes a clean dataset under ``tmp_path`` and returns a ``Generated`` holding the
format name and reader options (``read_dataset(g.fmt, **g.options)`` reads it) plus the exact rows
the reader must produce. Images are small PIL drawings whose colour and square position match the
captions, so the data is learnable by a tiny student as well.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
TEMPLATES = (
    "a {c} picture with a square in the {p}",
    "{p} square on {c}",
    "photo of a {c} background",
    "{c}",
)


@dataclass
class Generated:
    """A generated dataset: how to read it and what a reader must return for it."""

    fmt: str
    options: dict
    image_root: Path
    rows: list[dict] = field(default_factory=list)  # expected manifest rows, in manifest order

    @property
    def path(self) -> Path:
        return Path(self.options["path"])


def caption_for(i: int, j: int) -> str:
    """Caption ``j`` of image ``i``; distinct for every (i, j)."""
    colour = list(COLOURS)[i % len(COLOURS)]
    text = TEMPLATES[j % len(TEMPLATES)].format(c=colour, p=POSITIONS[(i // len(COLOURS)) % len(POSITIONS)])
    return f"{text} (image {i}, caption {j})"


def image_for(i: int, size: int = 24) -> Image.Image:
    colour = list(COLOURS.values())[i % len(COLOURS)]
    img = Image.new("RGB", (size, size), colour)
    corner = (i // len(COLOURS)) % len(POSITIONS)
    x, y = (corner % 2) * size // 2, (corner // 2) * size // 2
    ImageDraw.Draw(img).rectangle([x, y, x + size // 2 - 1, y + size // 2 - 1], fill=(128, 128, 128))
    return img


def write_image(path: Path, i: int, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_for(i, size).save(path)
    return path


def image_bytes(i: int, fmt: str = "PNG", size: int = 24) -> bytes:
    buf = io.BytesIO()
    image_for(i, size).save(buf, format=fmt)
    return buf.getvalue()


def _row(sample_id, image_id, image_path, caption, split="train", label=None) -> dict:
    return {"sample_id": sample_id, "image_id": image_id, "image_path": image_path, "caption": caption,
            "split": split, "label": label}


# ---- formats --------------------------------------------------------------------------------
def make_karpathy(
    tmp_path: Path,
    n_images: int = 8,
    captions_per_image: int = 2,
    splits: tuple[str, ...] = ("train", "val", "test", "restval"),
    coco_style: bool = False,
) -> Generated:
    """``dataset_*.json`` + ``images/``; image ``i`` gets split ``splits[i % len(splits)]``.

    ``coco_style`` adds ``filepath`` folders (train2014/val2014) and ``cocoid`` like dataset_coco.json.
    ids are offset (imgid = 10 + i, sentid = 1000 + ...) so a reader using row numbers is caught.
    """
    root = tmp_path / "karpathy"
    image_root = root / "images"
    entries, rows = [], []
    for i in range(n_images):
        split = splits[i % len(splits)]
        filepath = ("val2014" if split in ("val", "test") else "train2014") if coco_style else ""
        filename = f"img_{i:04d}.jpg"
        rel = f"{filepath}/{filename}" if filepath else filename
        write_image(image_root / rel, i)
        sentences = []
        for j in range(captions_per_image):
            sentid = 1000 + i * captions_per_image + j
            cap = caption_for(i, j)
            sentences.append({"raw": cap, "tokens": cap.lower().split(), "imgid": 10 + i, "sentid": sentid})
            rows.append(_row(sentid, 10 + i, rel, cap, split))
        entry = {"filename": filename, "imgid": 10 + i, "split": split, "sentences": sentences,
                 "sentids": [s["sentid"] for s in sentences]}
        if coco_style:
            entry.update(filepath=filepath, cocoid=500000 + i)
        entries.append(entry)
    name = "dataset_coco.json" if coco_style else "dataset_flickr30k.json"
    path = root / name
    path.write_text(json.dumps({"images": entries, "dataset": "coco" if coco_style else "flickr30k"}))
    return Generated("karpathy", {"path": path, "image_root": image_root}, image_root, rows)


def make_coco(
    tmp_path: Path, n_images: int = 6, captions_per_image: int = 2, split: str = "val"
) -> Generated:
    """``annotations/captions_<split>2017.json`` + ``<split>2017/``; sparse COCO-like ids."""
    root = tmp_path / "coco"
    image_root = root / f"{split}2017"
    images, annotations, rows = [], [], []
    for i in range(n_images):
        name = f"{i:012d}.jpg"
        write_image(image_root / name, i)
        images.append({"id": 7 + 3 * i, "file_name": name, "width": 24, "height": 24})
    # Annotations interleaved across images (as in the real files), ids not in row order.
    for j in range(captions_per_image):
        for i in range(n_images):
            ann_id = 90000 - 10 * (j * n_images + i)
            cap = caption_for(i, j)
            annotations.append({"id": ann_id, "image_id": 7 + 3 * i, "caption": cap})
            rows.append(_row(ann_id, 7 + 3 * i, images[i]["file_name"], cap, split))
    path = root / "annotations" / f"captions_{split}2017.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return Generated("coco", {"path": path, "image_root": image_root, "split": split}, image_root, rows)


def make_tabular(
    tmp_path: Path,
    n_images: int = 6,
    captions_per_image: int = 2,
    fmt: str = "csv",
    with_split: bool = False,
    with_label: bool = False,
    with_ids: bool = False,
) -> Generated:
    """A table (``csv``/``tsv``/``parquet``) with columns ``image``, ``text`` (+ split/label/ids).

    Rows are caption-major (all first captions, then all second ones), so ids by first appearance
    differ from ids by grouping. Images live in ``images/`` next to the table; the paths in the
    table are relative to that folder. Derived ids: image_id = i, sample_id = row number.
    """
    root = tmp_path / "tabular"
    image_root = root / "images"
    records, rows = [], []
    for i in range(n_images):
        write_image(image_root / f"im{i}.png", i)
    for j in range(captions_per_image):
        for i in range(n_images):
            n = len(records)
            split = ("train", "val", "test")[i % 3] if with_split else "train"
            label = list(COLOURS)[i % len(COLOURS)] if with_label else None
            sample_id, image_id = (5000 + 2 * n, 300 + i) if with_ids else (n, i)
            rec = {"image": f"im{i}.png", "text": caption_for(i, j)}
            if with_split:
                rec["split"] = split
            if with_label:
                rec["label"] = label
            if with_ids:
                rec.update(image_id=image_id, sample_id=sample_id)
            records.append(rec)
            rows.append(_row(sample_id, image_id, rec["image"], rec["text"], split, label))
    path = root / f"pairs.{fmt}"
    write_table(path, records)
    options = {"path": path, "image_root": image_root, "image_col": "image", "caption_col": "text"}
    if with_split:
        options["split_col"] = "split"
    if with_label:
        options["label_col"] = "label"
    if with_ids:
        options.update(image_id_col="image_id", sample_id_col="sample_id")
    return Generated("tabular", options, image_root, rows)


def write_table(path: Path, records: list[dict]) -> Path:
    """Write dict records as csv / tsv / parquet by suffix (all records share the first's keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(records[0])
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
        return path
    with open(path, "w", newline="", encoding="utf-8") as fh:
        if path.suffix == ".tsv":
            fh.write("\t".join(columns) + "\n")
            for r in records:
                fh.write("\t".join(str(r[c]) for c in columns) + "\n")
        else:
            w = csv.writer(fh)
            w.writerow(columns)
            w.writerows([[r[c] for c in columns] for r in records])
    return path


def make_folder(
    tmp_path: Path, n_images: int = 6, captions_per_image: int = 2, classes: tuple[str, ...] = ()
) -> Generated:
    """``folder/[<class>/]img_i.png`` + ``img_i.txt``; with ``classes`` image i goes to classes[i % n]."""
    root = tmp_path / "folder"
    paths = []
    for i in range(n_images):
        rel = f"{classes[i % len(classes)]}/img_{i:03d}.png" if classes else f"img_{i:03d}.png"
        write_image(root / rel, i)
        lines = [caption_for(i, j) for j in range(captions_per_image)]
        (root / rel).with_suffix(".txt").write_text("\n".join(lines) + "\n")
        paths.append((rel, i))
    rows = []
    for image_id, (rel, i) in enumerate(sorted(paths)):
        label = rel.split("/")[0] if classes else None
        for j in range(captions_per_image):
            rows.append(_row(len(rows), image_id, rel, caption_for(i, j), "train", label))
    options = {"path": root, "labels_from_parent": bool(classes)}
    return Generated("folder", options, root, rows)


def make_webdataset(
    tmp_path: Path,
    n_images: int = 6,
    captions_per_image: int = 2,
    n_shards: int = 2,
    caption_source: str = "json",
) -> Generated:
    """``shards/shard-00000.tar`` ...; keys ``%06d``; captions in ``.json`` ``captions`` or in ``.txt``.

    ``caption_source="txt"`` writes one ``.txt`` caption per sample (needs captions_per_image == 1)
    plus a ``.json`` with only a label, as img2dataset would.
    """
    if caption_source == "txt" and captions_per_image != 1:
        raise ValueError("a .txt member holds one caption")
    root = tmp_path / "shards"
    root.mkdir(parents=True)
    per_shard = -(-n_images // n_shards)
    rows = []
    for s in range(n_shards):
        shard_rel = f"shard-{s:05d}.tar"
        with tarfile.open(root / shard_rel, "w") as tf:
            for i in range(s * per_shard, min(n_images, (s + 1) * per_shard)):
                key = f"{i:06d}"
                caps = [caption_for(i, j) for j in range(captions_per_image)]
                label = list(COLOURS)[i % len(COLOURS)]
                meta = {"captions": caps, "label": label} if caption_source == "json" else {"label": label}
                add_member(tf, f"{key}.jpg", image_bytes(i, "JPEG"))
                add_member(tf, f"{key}.json", json.dumps(meta).encode())
                if caption_source == "txt":
                    add_member(tf, f"{key}.txt", caps[0].encode())
                for cap in caps:
                    rows.append(_row(len(rows), i, f"{shard_rel}::{key}.jpg", cap, "train", label))
    return Generated("webdataset", {"path": root}, root, rows)


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_all(tmp_path: Path, n_images: int = 6, captions_per_image: int = 2) -> dict[str, Generated]:
    """One clean dataset per format (tabular as csv), each in its own folder under ``tmp_path``."""
    return {
        "karpathy": make_karpathy(tmp_path, n_images, captions_per_image),
        "coco": make_coco(tmp_path, n_images, captions_per_image),
        "tabular": make_tabular(tmp_path, n_images, captions_per_image),
        "folder": make_folder(tmp_path, n_images, captions_per_image),
        "webdataset": make_webdataset(tmp_path, n_images, captions_per_image),
    }
