"""Image-only rows (issue 13's transfer data): declared by the reader, never confused with rejects, cached by
stage 1 (their images, no caption), left out of pair training with a note."""

from __future__ import annotations

import json
import tarfile
import numpy as np
import pytest

from pipeline.data.manifest import Manifest
from pipeline.data.readers import read_dataset
from pipeline.features.cache import FeatureCache
from pipeline.features.job import FeatureJob, run_feature_job
from stages.build_manifest import build_manifest
from tests import datagen
from tests.fake_teacher import FakeTeacher


def test_declared_image_only_rows_are_kept_and_empty_captions_still_rejected():
    rows = [
        {"sample_id": 0, "image_id": 0, "image_path": "a.png", "caption": "a cat"},
        {"sample_id": 1, "image_id": 1, "image_path": "b.png", "caption": "  "},  # a pair with no caption
        {"sample_id": 2, "image_id": 2, "image_path": "c.png", "caption": None, "unpaired": True},
        {"sample_id": 3, "image_id": 3, "image_path": "d.png", "caption": "has one", "unpaired": True},
    ]
    m = Manifest.from_rows(rows, source="test")
    assert m.column("sample_id").tolist() == [0, 2]
    assert m.image_only_mask().tolist() == [False, True]
    assert m.paired().column("sample_id").tolist() == [0]
    assert {r.source_row: r.reason for r in m.rejects} == {
        "1": "empty caption", "3": "declared unpaired but has both an image and a caption"}
    # paired manifests hash as before: the image-only support changes nothing for them
    assert Manifest.from_rows(rows[:1], source="x").content_hash == m.paired().content_hash


def test_folder_unpaired_keeps_images_without_sidecars_without_renumbering_pairs(tmp_path):
    g = datagen.make_folder(tmp_path, n_images=4, captions_per_image=2)
    (g.image_root / "img_001.txt").unlink()
    datagen.write_image(g.image_root / "extra" / "photo.png", 11)
    plain = read_dataset("folder", path=g.image_root)
    m = read_dataset("folder", path=g.image_root, unpaired=True)
    assert sorted(r.reason for r in plain.rejects) == ["no caption file (img_001.txt)", "no caption file (photo.txt)"]
    assert m.rejects == []
    pairs = m.paired().table.select(["sample_id", "image_id", "caption"]).to_pylist()
    assert pairs == plain.table.select(["sample_id", "image_id", "caption"]).to_pylist()
    only = m.table.filter(m.table.column("caption").is_null()).to_pylist()
    assert [(r["image_path"], r["sample_id"]) for r in only] == [("extra/photo.png", 6), ("img_001.png", 7)]


def test_a_folder_of_images_alone_through_the_command(tmp_path, capsys):
    root = tmp_path / "photos"
    for i in range(3):
        datagen.write_image(root / f"p{i}.png", i)
    paths = build_manifest("folder", root, tmp_path / "out", unpaired=True)
    assert "3 image-only rows" in capsys.readouterr().out
    m = Manifest.read(paths["train"])
    assert len(m) == 3 and m.image_only_mask().all()
    with pytest.raises(Exception, match="does not apply"):
        build_manifest("tabular", root, tmp_path / "out2", unpaired=True)


def test_stage1_caches_image_only_rows_and_stage2_uses_the_pairs(tmp_path):
    from pipeline.distill.data import align

    g = datagen.make_folder(tmp_path, n_images=6, captions_per_image=1)
    for i in (1, 4):
        (g.image_root / f"img_00{i}.txt").unlink()
    m = read_dataset("folder", path=g.image_root, unpaired=True)
    summary = run_feature_job(FeatureJob(m, "t", "train", tmp_path / "cache", num_workers=0), FakeTeacher(),
                              progress=False)
    assert summary.complete and summary.images == 6 and summary.texts == 4 and summary.rejects == 0
    cache = FeatureCache(tmp_path / "cache")
    image_only_ids = m.column("image_id")[m.image_only_mask()]
    assert set(image_only_ids.tolist()) <= set(cache.image_ids.tolist())  # their images are cached targets
    rows = align(m, cache)
    assert len(rows) == 4 and rows.image_only == 2 and rows.dropped == 0
    assert not np.isin(rows.image_ids, image_only_ids).any()


def test_tabular_unpaired_flag_column(tmp_path):
    for i in range(5):
        datagen.write_image(tmp_path / f"i{i}.png", i)
    (tmp_path / "pairs.csv").write_text(
        "image_path,caption,unpaired\n"
        "i0.png,a red square,0\n"
        "i1.png,,1\n"            # image-only
        "i2.png,a caption,yes\n"  # flagged but captioned: reject
        "i3.png,,maybe\n"        # not a flag: reject
        "i4.png,,\n"             # not flagged, no caption: the usual reject
        ",a caption alone,1\n"   # caption-only
        ",,1\n")                 # flagged with neither: reject
    m = read_dataset("tabular", path=tmp_path / "pairs.csv", unpaired_col="unpaired")
    assert [(r["image_path"], r["caption"]) for r in m.table.to_pylist()] == [
        ("i0.png", "a red square"), ("i1.png", None), (None, "a caption alone")]
    assert m.caption_only_mask().tolist() == [False, False, True] and m.column("image_id")[2] == -1
    reasons = sorted(r.reason for r in m.rejects)
    assert reasons == ["declared unpaired but has both an image and a caption", "empty caption",
                       "invalid unpaired flag 'maybe' in column 'unpaired' (use 1/0, true/false)",
                       "missing image path"]
    plain = read_dataset("tabular", path=tmp_path / "pairs.csv")  # without the option: unpaired rows are rejects
    assert len(plain) == 2 and not plain.image_only_mask().any() and not plain.caption_only_mask().any()


def test_caption_only_rows_are_declared_kept_apart_from_images_and_pairs():
    rows = [
        {"sample_id": 0, "image_id": 0, "image_path": "a.png", "caption": "a cat"},
        {"sample_id": 1, "image_id": 9, "image_path": None, "caption": "a dog alone", "unpaired": True},
        {"sample_id": 2, "image_id": 3, "image_path": None, "caption": None, "unpaired": True},  # neither
    ]
    m = Manifest.from_rows(rows, source="test")
    assert m.column("sample_id").tolist() == [0, 1] and m.column("image_id").tolist() == [0, -1]
    assert m.caption_only_mask().tolist() == [False, True] and not m.image_only_mask().any()
    assert m.paired().column("sample_id").tolist() == [0]
    assert m.unique_images()[1] == ["a.png"]  # a caption-only row has no image
    assert [r.reason for r in m.rejects] == ["declared unpaired but has neither an image nor a caption"]


def test_a_caption_list_through_the_command_and_stage1(tmp_path, capsys):
    (tmp_path / "captions.txt").write_text("a red square\n\n  a blue circle  \na red square\n")
    paths = build_manifest("captions", tmp_path / "captions.txt", tmp_path / "out")
    assert "3 caption-only rows" in capsys.readouterr().out
    m = Manifest.read(paths["train"])
    assert m.table.column("caption").to_pylist() == ["a red square", "a blue circle", "a red square"]
    assert m.column("sample_id").tolist() == [0, 2, 3]  # line numbers: blank lines are layout
    teacher = FakeTeacher()
    summary = run_feature_job(FeatureJob(m, "t", "train", tmp_path / "cache", num_workers=0), teacher,
                              progress=False)
    assert summary.complete and summary.images == 0 and summary.texts == 3
    cache = FeatureCache(tmp_path / "cache")
    assert len(cache.text) == 0 and cache.lone_sample_ids.tolist() == [0, 2, 3]
    want = teacher.encode_texts(teacher.tokenize(["a red square", "a blue circle", "a red square"])).numpy()
    np.testing.assert_allclose(cache.lone_text.to_array().astype(np.float32), want, atol=2e-3)  # fp16 cache


def test_webdataset_unpaired_keeps_images_without_captions_without_renumbering_pairs(tmp_path, capsys):
    g = datagen.make_webdataset(tmp_path, n_images=4, captions_per_image=2, n_shards=1)
    with tarfile.open(g.image_root / "shard-00001.tar", "w") as tf:  # shards of images alone, and one labelled
        datagen.add_member(tf, "000010.jpg", datagen.image_bytes(10, "JPEG"))
        datagen.add_member(tf, "000011.jpg", datagen.image_bytes(11, "JPEG"))
        datagen.add_member(tf, "000011.json", b'{"label": "red"}')
        datagen.add_member(tf, "000012.json", b'{"captions": []}')  # no image either: still a reject
    plain = read_dataset("webdataset", path=g.image_root)
    m = read_dataset("webdataset", path=g.image_root, unpaired=True)
    assert sorted(r.source_row for r in plain.rejects) == ["shard-00001.tar:000010", "shard-00001.tar:000011",
                                                           "shard-00001.tar:000012"]
    assert [(r.source_row, r.reason) for r in m.rejects] == [
        ("shard-00001.tar:000012", "image file not found (no image member for this key)")]
    assert m.paired().table.to_pylist() == plain.table.to_pylist()  # the pairs are exactly as before
    only = m.table.filter(m.table.column("caption").is_null()).to_pylist()
    assert [(r["sample_id"], r["image_id"], r["image_path"], r["label"]) for r in only] == [
        (8, 4, "shard-00001.tar::000010.jpg", None), (9, 5, "shard-00001.tar::000011.jpg", "red")]
    assert m.image_only_mask().sum() == 2 and m.source.endswith('{"unpaired": true}') and plain.source.endswith("{}")
    build_manifest("webdataset", g.image_root, tmp_path / "out", unpaired=True)
    assert "2 image-only rows" in capsys.readouterr().out


def test_coco_and_karpathy_unpaired_keep_images_without_captions(tmp_path):
    coco = datagen.make_coco(tmp_path, n_images=4, captions_per_image=2)
    data = json.loads(coco.path.read_text())
    datagen.write_image(coco.image_root / "extra.jpg", 20)
    data["images"] += [{"id": 5000, "file_name": "extra.jpg"}, {"id": 5001, "file_name": "gone.jpg"}]
    coco.path.write_text(json.dumps(data))
    plain, m = read_dataset("coco", **coco.options), read_dataset("coco", **coco.options, unpaired=True)
    assert {r.reason for r in plain.rejects} == {"image has no captions"}
    assert [r.reason.split(" (")[0] for r in m.rejects] == ["image file not found"]  # a missing file stays one
    assert m.paired().table.to_pylist() == plain.table.to_pylist()
    only = m.table.filter(m.table.column("caption").is_null()).to_pylist()
    top = max(a["id"] for a in data["annotations"])
    assert [(r["sample_id"], r["image_id"], r["image_path"], r["split"]) for r in only] == [
        (top + 1, 5000, "extra.jpg", "val")]

    kp = datagen.make_karpathy(tmp_path, n_images=4, captions_per_image=2)
    data = json.loads(kp.path.read_text())
    data["images"][1]["sentences"], data["images"][1]["sentids"] = [], []
    data["images"].append({"filename": "none.jpg", "imgid": 99, "split": "train", "sentences": []})
    kp.path.write_text(json.dumps(data))
    plain, m = read_dataset("karpathy", **kp.options), read_dataset("karpathy", **kp.options, unpaired=True)
    assert [r.reason for r in plain.rejects][0] == "image has no sentences" and len(plain.rejects) == 2
    assert [r.reason.split(" (")[0] for r in m.rejects] == ["image file not found"]
    assert m.paired().table.to_pylist() == plain.table.to_pylist()
    only = m.table.filter(m.table.column("caption").is_null()).to_pylist()
    assert [(r["sample_id"], r["image_id"], r["image_path"], r["split"]) for r in only] == [
        (1000 + 4 * 2, 11, "img_0001.jpg", "val")]  # after the largest sentid, the removed ones' included
