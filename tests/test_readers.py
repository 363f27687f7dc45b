"""Dataset readers: exact rows and ids per format, rejects with reasons, stable hashes, split hashing."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.common.errors import PipelineError
from pipeline.data.images import load_rgb
from pipeline.data.manifest import Manifest, read_rejects
from pipeline.data.readers import FORMATS, read_dataset
from pipeline.data.readers.common import assign_split, parse_split_fractions
from stages.build_manifest import build_manifest
from tests import datagen


def read(g: datagen.Generated, **extra) -> Manifest:
    return read_dataset(g.fmt, **{**g.options, **extra})


def reject_map(m: Manifest) -> dict[str, str]:
    return {r.source_row: r.reason for r in m.rejects}


def load_json(path: Path):
    return json.loads(path.read_text())


def dump_json(path: Path, data) -> None:
    path.write_text(json.dumps(data))


# ---- clean datasets: exact rows, decodable images ---------------------------------------------
GENERATORS = {
    "karpathy": lambda t: datagen.make_karpathy(t),
    "karpathy-coco": lambda t: datagen.make_karpathy(t, coco_style=True),
    "coco": lambda t: datagen.make_coco(t),
    "csv": lambda t: datagen.make_tabular(t, fmt="csv"),
    "tsv-all-columns": lambda t: datagen.make_tabular(
        t, fmt="tsv", with_split=True, with_label=True, with_ids=True
    ),
    "parquet-all-columns": lambda t: datagen.make_tabular(
        t, fmt="parquet", with_split=True, with_label=True, with_ids=True
    ),
    "folder": lambda t: datagen.make_folder(t),
    "folder-classes": lambda t: datagen.make_folder(t, classes=("cat", "dog")),
    "webdataset-json": lambda t: datagen.make_webdataset(t),
    "webdataset-txt": lambda t: datagen.make_webdataset(t, captions_per_image=1, caption_source="txt"),
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_clean_dataset_reads_exactly(tmp_path, name):
    g = GENERATORS[name](tmp_path)
    m = read(g)
    assert m.rejects == []
    assert m.table.to_pylist() == g.rows
    assert Path(m.image_root) == g.image_root
    assert m.source.startswith(f"{g.fmt}:")
    # Every stored location decodes to the image the generator drew (tar members included).
    ids, paths = m.unique_images()
    assert len(ids) == len({r["image_id"] for r in g.rows})
    for p in paths:
        assert not Path(p.split("::")[0]).is_absolute()
        assert load_rgb(m.resolve(p)).size == (24, 24)


def test_formats_registry_lists_every_reader():
    assert set(FORMATS) == {"karpathy", "coco", "tabular", "folder", "webdataset", "captions"}
    assert all(isinstance(v, str) and v for v in FORMATS.values())


# ---- karpathy -------------------------------------------------------------------------------
def test_karpathy_defects_become_rejects_and_valid_rows_stay(tmp_path):
    g = datagen.make_karpathy(tmp_path, n_images=8, captions_per_image=2)
    data = load_json(g.path)
    imgs = data["images"]
    (g.image_root / imgs[1]["filename"]).unlink()  # missing image file
    imgs[2]["sentences"][0]["raw"] = "   "  # empty caption
    imgs[3]["sentences"][1]["sentid"] = imgs[0]["sentences"][0]["sentid"]  # duplicate sample id
    imgs[4]["sentences"][0]["raw"] = 42  # non-string caption
    del imgs[5]["filename"]  # malformed entry
    imgs[6]["imgid"] = imgs[0]["imgid"]  # duplicate image id, different file
    imgs.append("not an object")
    imgs[7]["sentences"] = []  # an image with no captions is reported, not silently dropped
    dump_json(g.path, data)

    m = read(g)
    name = g.path.name
    s = lambda i, j: f"{name}:images[{i}].sentences[{j}]"  # noqa: E731
    assert reject_map(m) == {
        s(1, 0): f"image file not found (tried {g.image_root / imgs[1]['filename']})",
        s(1, 1): f"image file not found (tried {g.image_root / imgs[1]['filename']})",
        s(2, 0): "empty caption",
        s(3, 1): "duplicate sample_id 1000",
        s(4, 0): "caption is not a string (int)",
        f"{name}:images[5]": "malformed image entry: missing 'filename'",
        s(6, 0): "duplicate image_id 10 (already used by img_0000.jpg)",
        s(6, 1): "duplicate image_id 10 (already used by img_0000.jpg)",
        f"{name}:images[7]": "image has no sentences",
        f"{name}:images[8]": "malformed image entry: not a JSON object",
    }
    bad = {(1, 0), (1, 1), (2, 0), (3, 1), (4, 0), (5, 0), (5, 1), (6, 0), (6, 1), (7, 0), (7, 1)}
    expected = [r for k, r in enumerate(g.rows) if (k // 2, k % 2) not in bad]
    assert m.table.to_pylist() == expected


def test_karpathy_restval_folding(tmp_path):
    g = datagen.make_karpathy(tmp_path, n_images=8)
    kept = read(g)
    folded = read(g, restval_to_train=True)
    assert "restval" in kept.splits and "restval" not in folded.splits
    assert kept.table.to_pylist() == g.rows
    assert folded.table.to_pylist() == [{**r, "split": "train" if r["split"] == "restval" else r["split"]}
                                        for r in g.rows]
    assert len(folded.split("train")) == len(kept.split("train")) + len(kept.split("restval"))


@pytest.mark.parametrize(
    "content, message",
    [(None, "not found"), ("{not json", "cannot read JSON"), ('{"dataset": "x"}', "no top-level 'images'")],
)
def test_karpathy_unusable_file_is_one_line_error(tmp_path, content, message):
    path = tmp_path / "dataset_x.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PipelineError, match=message):
        read_dataset("karpathy", path=path)


# ---- coco -----------------------------------------------------------------------------------
def test_coco_defects_become_rejects_and_valid_rows_stay(tmp_path):
    g = datagen.make_coco(tmp_path, n_images=6, captions_per_image=2, split="val")
    data = load_json(g.path)
    anns = data["annotations"]  # caption-major: annotation k belongs to image k % 6
    (g.image_root / data["images"][1]["file_name"]).unlink()
    anns[2]["caption"] = ""
    anns[3]["id"] = anns[0]["id"]
    anns[4]["image_id"] = 999
    anns[5]["caption"] = ["a list"]
    anns.append("junk")
    data["images"].append({"id": "x", "file_name": 3})
    data["images"].append({"id": 4242, "file_name": data["images"][0]["file_name"].replace("0", "9")})
    dump_json(g.path, data)

    m = read(g)
    a = lambda k: f"{g.path.name}:annotations[{k}]"  # noqa: E731
    assert reject_map(m) == {
        a(1): f"image file not found (tried {g.image_root / data['images'][1]['file_name']})",
        a(7): f"image file not found (tried {g.image_root / data['images'][1]['file_name']})",
        a(2): "empty caption",
        a(3): f"duplicate sample_id {anns[0]['id']}",
        a(4): "unknown image_id 999",
        a(5): "caption is not a string (list)",
        a(12): "malformed annotation: not a JSON object",
        f"{g.path.name}:images[6]": "malformed image entry: needs integer 'id' and 'file_name'",
        f"{g.path.name}:images[7]": "image has no captions",
    }
    expected = [r for k, r in enumerate(g.rows) if k not in {1, 2, 3, 4, 5, 7}]
    assert m.table.to_pylist() == expected
    assert set(m.splits) == {"val"}


def test_coco_requires_annotations(tmp_path):
    path = tmp_path / "captions.json"
    dump_json(path, {"images": []})
    with pytest.raises(PipelineError, match="annotations"):
        read_dataset("coco", path=path)


# ---- tabular ----------------------------------------------------------------------------------
def test_csv_defects_derived_ids_and_line_numbers(tmp_path):
    for i, name in enumerate(["a.png", "c.png", "d.png", "e.png"]):
        datagen.write_image(tmp_path / name, i)
    lines = [
        b"image,text,label",  # 1
        b"a.png,cap a0,x",  # 2  row 0: ok
        b"b.png,cap b0,y",  # 3  row 1: image missing (still numbers b.png as image 1)
        b'a.png,"cap, a1",x',  # 4  row 2: ok, quoted comma
        b"c.png,,z",  # 5  row 3: empty caption (c.png -> image 2)
        b"c.png,cap c1",  # 6  row 4: malformed
        b"",  # 7  blank line: skipped
        b'd.png,"multi',  # 8  row 5: quoted newline (d.png -> image 3)
        b'line caption",w',  # 9
        b"e.png,caf\xe9,v",  # 10 row 6: bad UTF-8 (e.png -> image 4)
        b"c.png,cap c2,z",  # 11 row 7: ok
        b"e.png,cap e1,",  # 12 row 8: ok, empty label -> null
    ]
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    m = read_dataset("tabular", path=path, image_col="image", caption_col="text", label_col="label")
    assert reject_map(m) == {
        "pairs.csv:3": f"image file not found (tried {tmp_path / 'b.png'})",
        "pairs.csv:5": "empty caption",
        "pairs.csv:6": "malformed row: expected 3 fields, got 2",
        "pairs.csv:10": "column(s) ['text'] are not valid UTF-8",
    }
    row = lambda sid, iid, p, c, label: dict(  # noqa: E731
        sample_id=sid, image_id=iid, image_path=p, caption=c, split="train", label=label
    )
    assert m.table.to_pylist() == [
        row(0, 0, "a.png", "cap a0", "x"),
        row(2, 0, "a.png", "cap, a1", "x"),
        row(5, 3, "d.png", "multi\r\nline caption", "w"),
        row(7, 2, "c.png", "cap c2", "z"),
        row(8, 4, "e.png", "cap e1", None),
    ]
    # Rejects survive the parquet round trip (bad bytes replaced, not crashing the writer).
    assert len(read_rejects(m.write_rejects(tmp_path / "rejects.parquet"))) == 4


def test_tsv_keeps_quotes_and_relativises_absolute_paths(tmp_path):
    root = tmp_path / "imgs"
    datagen.write_image(root / "x.png", 0)
    outside = datagen.write_image(tmp_path / "elsewhere" / "y.png", 1)
    path = tmp_path / "t.tsv"
    lines = [
        "image_path\tcaption",
        f'{root / "x.png"}\t"quoted" caption, a tab-separated one',
        f"{outside}\tother",
    ]
    path.write_text("\n".join(lines) + "\n")
    m = read_dataset("tabular", path=path, image_root=root)
    assert m.rejects == []
    assert m.column("image_path").tolist() == ["x.png", outside.as_posix()]
    assert m.column("caption").tolist() == ['"quoted" caption, a tab-separated one', "other"]


def test_parquet_id_columns_conflicts_and_bad_values(tmp_path):
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        datagen.write_image(tmp_path / name, i)
    records = [
        ("a.png", "ok a", "5", "100"),  # 0 ok
        ("b.png", "b", "5", "101"),  # 1 image id 5 is a.png's
        ("a.png", "a again", "6", "102"),  # 2 a.png already has id 5
        ("a.png", "dup", "5", "100"),  # 3 duplicate sample id
        ("c.png", "c", "x", "103"),  # 4 bad image id
        ("c.png", None, "7", "104"),  # 5 null caption
        ("c.png", "ok c", "7", "105"),  # 6 ok
    ]
    cols = ["img", "cap", "iid", "sid"]
    path = datagen.write_table(tmp_path / "t.parquet", [dict(zip(cols, r)) for r in records])
    m = read_dataset(
        "tabular", path=path, image_col="img", caption_col="cap", image_id_col="iid", sample_id_col="sid"
    )
    assert reject_map(m) == {
        "t.parquet:1": "duplicate image_id 5 (already used by a.png)",
        "t.parquet:2": "image a.png already has image_id 5, not 6",
        "t.parquet:3": "duplicate sample_id 100",
        "t.parquet:4": "invalid image_id 'x'",
        "t.parquet:5": "empty caption",
    }
    assert m.table.select(["sample_id", "image_id", "caption"]).to_pylist() == [
        {"sample_id": 100, "image_id": 5, "caption": "ok a"},
        {"sample_id": 105, "image_id": 7, "caption": "ok c"},
    ]


def test_parquet_non_string_values_are_rejects(tmp_path):
    datagen.write_image(tmp_path / "a.png", 0)
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image_path": ["a.png", "a.png"], "caption": [3, 4]}), path)
    m = read_dataset("tabular", path=path)
    assert len(m) == 0 and {r.reason for r in m.rejects} == {"caption is not a string (int)"}
    pq.write_table(pa.table({"image_path": [1], "caption": ["c"]}), path)
    expected = {"t.parquet:0": "image path is not a string (int)"}
    assert reject_map(read_dataset("tabular", path=path)) == expected


def test_tabular_unusable_input_is_one_line_error(tmp_path):
    g = datagen.make_tabular(tmp_path, fmt="csv")
    with pytest.raises(PipelineError, match=r"missing column\(s\) \['caption'\]"):
        read_dataset("tabular", path=g.path, image_col="image")
    with pytest.raises(PipelineError, match="not found"):
        read_dataset("tabular", path=tmp_path / "nope.csv")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(PipelineError, match="cannot read parquet"):
        read_dataset("tabular", path=bad)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(PipelineError, match="empty table"):
        read_dataset("tabular", path=tmp_path / "empty.csv")
    with pytest.raises(PipelineError, match="not both"):
        read(g, split_col="text", split_fractions="train=1")


# ---- folder ---------------------------------------------------------------------------------
def test_folder_defects_and_blank_lines(tmp_path):
    g = datagen.make_folder(tmp_path, n_images=4, captions_per_image=2)
    root = g.image_root
    (root / "img_001.txt").unlink()
    (root / "orphan.txt").write_text("a caption without an image\n")
    (root / "img_002.txt").write_text("\n   \n")
    (root / "img_003.txt").write_text("first\n\n  \nsecond\n")
    datagen.write_image(root / "img_004.png", 4)
    datagen.write_image(root / "img_004.jpg", 5)
    (root / "img_004.txt").write_text("whose caption?\n")
    datagen.write_image(root / ".ipynb_checkpoints" / "hidden.png", 6)
    (root / "bad.txt").write_bytes(b"caf\xe9\n")
    datagen.write_image(root / "bad.png", 7)

    m = read(g)
    assert reject_map(m) == {
        "img_001.png": "no caption file (img_001.txt)",
        "img_002.txt": "empty caption",
        "img_004.txt": "ambiguous caption file: img_004.txt matches ['img_004.jpg', 'img_004.png']",
        "orphan.txt": "image file not found (caption file without an image)",
        "bad.txt": "caption file is not valid UTF-8",
    }
    # Sorted images: bad.png 0, img_000.png 1, img_001.png 2, img_002.png 3, img_003.png 4, ...
    assert m.table.select(["sample_id", "image_id", "image_path", "caption"]).to_pylist() == [
        {"sample_id": 0, "image_id": 1, "image_path": "img_000.png", "caption": datagen.caption_for(0, 0)},
        {"sample_id": 1, "image_id": 1, "image_path": "img_000.png", "caption": datagen.caption_for(0, 1)},
        {"sample_id": 2, "image_id": 4, "image_path": "img_003.png", "caption": "first"},
        {"sample_id": 3, "image_id": 4, "image_path": "img_003.png", "caption": "second"},
    ]


def test_folder_labels_from_parent(tmp_path):
    g = datagen.make_folder(tmp_path, n_images=4, captions_per_image=1, classes=("cat", "dog"))
    datagen.write_image(g.image_root / "loose.png", 9)
    (g.image_root / "loose.txt").write_text("no class\n")
    m = read(g)
    assert reject_map(m) == {"loose.txt:1": "image is not inside a class folder"}
    assert [(r["image_path"], r["label"]) for r in m.table.to_pylist()] == [
        ("cat/img_000.png", "cat"),
        ("cat/img_002.png", "cat"),
        ("dog/img_001.png", "dog"),
        ("dog/img_003.png", "dog"),
    ]
    # Without the option the same folder is unlabelled and the loose image is a normal row.
    plain = read(g, labels_from_parent=False)
    assert plain.rejects == [] and set(plain.column("label").tolist()) == {None}


# ---- webdataset -------------------------------------------------------------------------------
def test_webdataset_defects_and_bad_shard(tmp_path):
    g = datagen.make_webdataset(tmp_path, n_images=6, captions_per_image=2, n_shards=2)
    jpg = datagen.image_bytes(0, "JPEG")
    with tarfile.open(g.image_root / "shard-00002.tar", "w") as tf:  # out of key order on purpose
        datagen.add_member(tf, "000104.jpg", jpg)
        datagen.add_member(tf, "000100.json", b'{"captions": ["no image"]}')
        datagen.add_member(tf, "000101.jpg", jpg)
        datagen.add_member(tf, "000102.jpg", jpg)
        datagen.add_member(tf, "000102.json", b"{bad")
        datagen.add_member(tf, "000103.jpg", jpg)
        datagen.add_member(tf, "000103.json", b'{"captions": ["ok one", 5, ""]}')
        datagen.add_member(tf, "000104.txt", b"txt caption\n")
    (g.image_root / "shard-00003.tar").write_bytes(b"definitely not a tar file" * 40)

    m = read(g)
    rejects = reject_map(m)
    assert rejects.pop("shard-00003.tar").startswith("cannot read tar shard")
    assert rejects.pop("shard-00002.tar:000102").startswith("malformed json member")
    assert rejects == {
        "shard-00002.tar:000100": "image file not found (no image member for this key)",
        "shard-00002.tar:000101": "no caption (.txt member or json 'caption'/'captions')",
        "shard-00002.tar:000103:captions[1]": "caption is not a string (int)",
        "shard-00002.tar:000103:captions[2]": "empty caption",
    }
    tail = m.table.to_pylist()[len(g.rows):]
    assert m.table.to_pylist()[: len(g.rows)] == g.rows
    assert [(r["sample_id"], r["image_id"], r["image_path"], r["caption"]) for r in tail] == [
        (12, 9, "shard-00002.tar::000103.jpg", "ok one"),
        (14, 10, "shard-00002.tar::000104.jpg", "txt caption"),
    ]
    assert load_rgb(m.resolve(tail[1]["image_path"])).size == (24, 24)


def test_webdataset_all_shards_unreadable_is_error(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"x" * 1000)
    with pytest.raises(PipelineError, match="no readable tar shard"):
        read_dataset("webdataset", path=tmp_path)
    with pytest.raises(PipelineError, match="shards not found"):
        read_dataset("webdataset", path=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no .tar shards"):
        read_dataset("webdataset", path=tmp_path / "empty")


# ---- dispatch ---------------------------------------------------------------------------------
def test_read_dataset_rejects_unknown_format_and_options(tmp_path):
    with pytest.raises(PipelineError, match="unknown dataset format 'jsonl'"):
        read_dataset("jsonl", path=tmp_path)
    with pytest.raises(PipelineError, match=r"does not take option\(s\) \['image_col'\]"):
        read_dataset("folder", path=tmp_path, image_col="x")
    with pytest.raises(PipelineError, match=r"needs option\(s\) \['path'\]"):
        read_dataset("coco")


# ---- content hash ---------------------------------------------------------------------------
def replace_caption(root: Path, old: str, new: str) -> int:
    """Replace a caption in whatever file (json, csv, txt, tar member) holds it; returns files changed."""
    changed = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix == ".tar":
            with tarfile.open(path) as tf:
                members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
            if not any(old.encode() in data for _, data in members):
                continue
            with tarfile.open(path, "w") as tf:
                for m, data in members:
                    data = data.replace(old.encode(), new.encode())
                    m.size = len(data)
                    tf.addfile(m, io.BytesIO(data))
            changed += 1
        elif path.suffix in (".json", ".csv", ".txt") and old.encode() in path.read_bytes():
            path.write_bytes(path.read_bytes().replace(old.encode(), new.encode()))
            changed += 1
    return changed


@pytest.mark.parametrize("fmt", ["karpathy", "coco", "tabular", "folder", "webdataset"])
def test_content_hash_stable_and_sensitive_to_captions(tmp_path, fmt):
    g = datagen.make_all(tmp_path, n_images=4, captions_per_image=2)[fmt]
    first, second = read(g), read(g)
    assert first.content_hash == second.content_hash
    assert first.table.equals(second.table)
    old = datagen.caption_for(1, 0)
    top = tmp_path / g.image_root.relative_to(tmp_path).parts[0]  # this format's own folder
    assert replace_caption(top, old, old + " edited") == 1
    third = read(g)
    assert third.content_hash != first.content_hash
    diff = [(a, b) for a, b in zip(first.table.to_pylist(), third.table.to_pylist()) if a != b]
    assert len(diff) == 1 and diff[0][1]["caption"] == old + " edited"


# ---- split fractions ------------------------------------------------------------------------
def test_assign_split_matches_fractions_and_ignores_order():
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    keys = [f"img_{i}.jpg" for i in range(4000)]
    splits = [assign_split(k, fractions) for k in keys]
    counts = Counter(splits)
    for name, f in fractions.items():
        assert abs(counts[name] / len(keys) - f) < 0.03, counts
    reordered = {"test": 0.1, "val": 0.1, "train": 0.8}
    assert [assign_split(k, reordered) for k in keys] == splits
    assert {assign_split(k, None) for k in keys[:50]} == {"train"}
    assert {assign_split(k, {"train": 0.0, "val": 1.0}) for k in keys[:50]} == {"val"}


@pytest.mark.parametrize("spec", ["train=0.9", "train=x,val=0.1", "train0.9", "train=1.2,val=-0.2", "=1"])
def test_bad_split_fractions_are_errors(spec):
    with pytest.raises(PipelineError, match="split fractions"):
        parse_split_fractions(spec)


def test_parse_split_fractions_forms():
    assert parse_split_fractions("train=0.9, val=0.05,test=0.05") == {"train": 0.9, "val": 0.05, "test": 0.05}
    assert parse_split_fractions({"a": 1}) == {"a": 1.0}
    assert parse_split_fractions(None) is None


@pytest.mark.parametrize("fmt", ["tabular", "folder", "webdataset"])
def test_split_fractions_per_image_and_deterministic(tmp_path, fmt):
    make = {"tabular": datagen.make_tabular, "folder": datagen.make_folder}.get(fmt, datagen.make_webdataset)
    g = make(tmp_path, n_images=30, captions_per_image=3)
    fractions = "train=0.5,val=0.25,test=0.25"
    m = read(g, split_fractions=fractions)
    again = read(g, split_fractions={"test": 0.25, "val": 0.25, "train": 0.5})
    assert m.table.equals(again.table)
    rows = m.table.to_pylist()
    by_image = {}
    for r in rows:
        by_image.setdefault(r["image_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_image.values())
    assert set(m.splits) == {"train", "val", "test"}
    parsed = parse_split_fractions(fractions)
    # Reference: the split is the hash of the image key (relative path; shard::key for tar members).
    key = lambda p: p.rsplit(".", 1)[0] if "::" in p else p  # noqa: E731
    assert [r["split"] for r in rows] == [assign_split(key(r["image_path"]), parsed) for r in rows]
    # Everything but the split column is what the reader produces without fractions.
    assert [{**r, "split": "train"} for r in rows] == g.rows


# ---- stage ------------------------------------------------------------------------------------
def test_build_manifest_stage_end_to_end(tmp_path, capsys):
    g = datagen.make_karpathy(tmp_path, n_images=8, captions_per_image=2)
    missing = g.rows[2]["image_path"]
    (g.image_root / missing).unlink()
    out = tmp_path / "out"
    paths = build_manifest("karpathy", g.path, out, image_root=g.image_root, restval_to_train=True)
    assert set(paths) == {"train", "val", "test", "rejects"}
    names = sorted(p.name for p in out.iterdir())
    assert names == ["rejects.parquet", "test.parquet", "train.parquet", "val.parquet"]
    expected = [{**r, "split": "train" if r["split"] == "restval" else r["split"]}
                for r in g.rows if r["image_path"] != missing]
    for split in ("train", "val", "test"):
        m = Manifest.read(paths[split])
        assert m.table.to_pylist() == [r for r in expected if r["split"] == split]
        assert Path(m.image_root) == g.image_root
        assert "restval_to_train" in m.source
    rejects = read_rejects(paths["rejects"])
    tried = f"image file not found (tried {g.image_root / missing})"
    assert [(r.image_path, r.reason) for r in rejects] == [(missing, tried)] * 2
    printed = capsys.readouterr().out
    for split in ("train", "val", "test"):
        n_rows = sum(r["split"] == split for r in expected)
        n_images = len({r["image_id"] for r in expected if r["split"] == split})
        assert re.search(rf"{split}\s+{n_rows} rows\s+{n_images} images", printed), printed
    assert re.search(r"rejects\s+2 rows", printed) and re.search(r"2\s+image file not found", printed)
    assert f"tried {g.image_root / missing}" in printed  # the summary shows where it looked


def test_build_manifest_cli_parsing(tmp_path):
    g = datagen.make_tabular(tmp_path, n_images=20, captions_per_image=2)
    app = __import__("typer").Typer()
    app.command("build-manifest")(build_manifest)
    app.command("other")(lambda: None)  # two commands so the subcommand name is parsed as in stages.cli
    out = tmp_path / "out"
    args = ["build-manifest", "tabular", str(g.path), "--out", str(out), "--image-root", str(g.image_root),
            "--image-col", "image", "--caption-col", "text", "--split-fractions", "train=0.5,val=0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    train, val = Manifest.read(out / "train.parquet"), Manifest.read(out / "val.parquet")
    assert len(train) + len(val) == len(g.rows) and len(train) > 0 and len(val) > 0
    assert "rejects" in result.output


def test_build_manifest_stage_errors(tmp_path):
    g = datagen.make_karpathy(tmp_path, n_images=2)
    with pytest.raises(PipelineError, match="--image-col does not apply to format 'karpathy'"):
        build_manifest("karpathy", g.path, tmp_path / "o", image_col="x")
    for p in g.image_root.iterdir():
        p.unlink()
    out = tmp_path / "all-bad"
    with pytest.raises(PipelineError, match=f"no image found under --image-root {g.image_root}") as err:
        build_manifest("karpathy", g.path, out, image_root=g.image_root)
    assert "\n" not in str(err.value) and "use --image-root" not in str(err.value)  # nowhere to point to
    assert len(read_rejects(out / "rejects.parquet")) == len(g.rows)


@pytest.mark.parametrize("mistake", ["too deep", "too shallow"])
def test_a_wrong_image_root_names_the_root_that_works(tmp_path, mistake):
    g = datagen.make_karpathy(tmp_path, n_images=4)
    if mistake == "too deep":  # the paths start with the root's last folder: a doubled prefix
        data = load_json(g.path)
        for img in data["images"]:
            img["filepath"] = g.image_root.name
        dump_json(g.path, data)
        wrong, right = g.image_root / "nested", g.image_root.parent
        wrong.mkdir()
    else:  # the images sit one folder below the given root
        right = g.image_root / "flickr30k-images"
        right.mkdir()
        for p in list(g.image_root.glob("*.jpg")):
            p.rename(right / p.name)
        wrong = g.image_root
    with pytest.raises(PipelineError) as err:
        build_manifest("karpathy", g.path, tmp_path / "out", image_root=wrong)
    msg = str(err.value)
    assert "\n" not in msg and f"--image-root {wrong}" in msg and msg.endswith(f"use --image-root {right}")
    build_manifest("karpathy", g.path, tmp_path / "out", image_root=right)  # the suggestion works


def test_build_manifest_notes_stale_split_files(tmp_path, capsys):
    g = datagen.make_karpathy(tmp_path, n_images=8)
    out = tmp_path / "out"
    build_manifest("karpathy", g.path, out, image_root=g.image_root)
    assert (out / "restval.parquet").exists()
    capsys.readouterr()
    build_manifest("karpathy", g.path, out, image_root=g.image_root, restval_to_train=True)
    assert "['restval.parquet'] from an earlier build" in capsys.readouterr().out
