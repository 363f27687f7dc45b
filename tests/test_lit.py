"""The offline LiT teacher: real packaged towers, heads trained for a few epochs on generated shapes."""

from __future__ import annotations

import copy
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from pipeline.common.errors import PipelineError
from pipeline.retrieval.metrics import recall_at_k
from pipeline.distill.lit_heads import feature_cache_path, train_lit_heads
from pipeline.data.manifest import Manifest
from pipeline.teachers import load_teacher
from pipeline.teachers.lit import LitImageTransform, LitTeacher, LitTowers
from stages.build_lit import build_lit

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (240, 220, 30),
           "purple": (140, 50, 170), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
EPOCHS = 40


def _draw(colour: str, shape: str, size: int = 96) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d, m, fill = ImageDraw.Draw(img), size // 6, COLOURS[colour]
    if shape == "circle":
        d.ellipse([m, m, size - m, size - m], fill=fill)
    elif shape == "square":
        d.rectangle([m, m, size - m, size - m], fill=fill)
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fill)
    return img


def _write_split(root, split: str, combos, first_id: int, corrupt: bool = False) -> Manifest:
    rows, sid = [], first_id * 10
    for i, (colour, shape) in enumerate(combos):
        iid = first_id + i
        _draw(colour, shape).save(root / f"{iid}.png")
        for cap in (f"a {colour} {shape}", f"{shape} painted {colour} on a white background"):
            rows.append({"sample_id": sid, "image_id": iid, "image_path": f"{iid}.png", "caption": cap,
                         "split": split})
            sid += 1
    if corrupt:  # a truncated file: must be skipped and counted, its neighbours kept
        (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        rows.append({"sample_id": sid, "image_id": first_id + len(combos), "image_path": "broken.png",
                     "caption": "a broken picture", "split": split})
    return Manifest.from_rows(rows, source="generated shapes", image_root=root)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train once for the module: 12 train images (+1 corrupt), 4 val images."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lit")
    (root / "images").mkdir()
    train_combos = [(c, s) for c in ("red", "green", "blue", "yellow") for s in SHAPES]
    val_combos = [("purple", "circle"), ("purple", "square"), ("black", "triangle"), ("black", "circle")]
    _write_split(root / "images", "train", train_combos, 0, corrupt=True).write(root / "train.parquet")
    _write_split(root / "images", "val", val_combos, 100).write(root / "val.parquet")
    ckpt = root / "lit.pt"
    summary = train_lit_heads(root / "train.parquet", ckpt, val_manifest=root / "val.parquet", epochs=EPOCHS,
                              lr=3e-3, batch_size=8, num_workers=0, progress=False)
    return {"root": root, "ckpt": ckpt, "summary": summary, "teacher": LitTeacher.load(ckpt),
            "combos": train_combos}


def test_image_transform_is_picklable_and_scales_like_the_tf_weights():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 300, 3), dtype=np.uint8))
    t = LitImageTransform()
    x = t(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    resized = img.resize((round(300 * 224 / 90), 224), Image.BICUBIC)
    left = (resized.width - 224) // 2
    ref = (np.asarray(resized.crop((left, 0, left + 224, 224)), dtype=np.float32) - 127) / 128
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-6)
    assert torch.equal(pickle.loads(pickle.dumps(t))(img), x)


def test_checkpoint_roundtrip_width_and_unit_norm(trained):
    teacher, s = trained["teacher"], trained["summary"]
    assert teacher.width == 512 and s["width"] == 512 and 1 <= s["best_epoch"] <= EPOCHS
    assert teacher.summary == s
    t = LitImageTransform()
    pixels = torch.stack([t(_draw("red", "circle")), t(_draw("blue", "square"))])
    img = teacher.encode_images(pixels)
    txt = teacher.encode_texts(teacher.tokenize(["a red circle", "a blue square", "x"]))
    assert img.shape == (2, 512) and txt.shape == (3, 512)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"):
        assert key in s["val"]


def test_decode_failure_is_counted_and_neighbours_kept(trained):
    s = trained["summary"]
    assert s["image_failures"] == 1 and "broken.png" in s["image_failure_examples"][0]
    assert s["train_images"] == 12 and s["train_pairs"] == 24
    assert s["val_images"] == 4 and s["val_pairs"] == 8


def retrieval_recall(img: torch.Tensor, txt: torch.Tensor, txt_image: torch.Tensor) -> dict:
    return recall_at_k(img.numpy(), txt.numpy(), txt_image.numpy())


def test_trained_heads_retrieve_training_pairs_better_than_chance(trained):
    teacher, combos = trained["teacher"], trained["combos"]
    t = LitImageTransform()
    pixels = torch.stack([t(_draw(c, s)) for c, s in combos])
    captions = [f"a {c} {s}" for c, s in combos]
    txt_image = torch.arange(len(combos))
    r = retrieval_recall(teacher.encode_images(pixels), teacher.encode_texts(teacher.tokenize(captions)),
                         txt_image)
    chance_r1 = 100.0 / len(combos)  # 8.3%
    assert r["i2t_r1"] >= 50.0 and r["t2i_r1"] >= 50.0, (r, chance_r1)
    # and clearly better than the same towers with untrained heads
    untrained = LitTeacher(type(teacher.heads)(512), towers=teacher.towers)
    r0 = retrieval_recall(untrained.encode_images(pixels),
                          untrained.encode_texts(untrained.tokenize(captions)), txt_image)
    assert r["rsum"] > r0["rsum"] + 100


def test_teacher_matches_cached_tower_features(trained):
    teacher = trained["teacher"]
    with np.load(feature_cache_path(trained["ckpt"], "train")) as z:
        ids, feats = z["image_ids"], z["image_feats"]
    pos = int(np.flatnonzero(ids == 4)[0])  # image 4 is combos[4]
    pixels = LitImageTransform()(_draw(*trained["combos"][4]))[None]
    torch.testing.assert_close(teacher.towers.image_features(pixels)[0], torch.from_numpy(feats[pos]),
                               atol=1e-4, rtol=1e-4)
    expected = F.normalize(teacher.heads.image(torch.from_numpy(feats[pos : pos + 1])), dim=-1)
    torch.testing.assert_close(teacher.encode_images(pixels), expected, atol=1e-4, rtol=1e-4)


def test_fingerprint_tracks_heads(trained):
    teacher = trained["teacher"]
    fp = teacher.fingerprint()
    assert fp.startswith("lit-") and LitTeacher(teacher.heads, towers=teacher.towers).fingerprint() == fp
    saved = copy.deepcopy(teacher.heads.state_dict())
    with torch.no_grad():
        teacher.heads.logit_scale.add_(1.0)  # temperature does not change embeddings: same fingerprint
        assert teacher.fingerprint() == fp
        teacher.heads.text.proj.weight[0, 0] += 1e-3
        assert teacher.fingerprint() != fp
    teacher.heads.load_state_dict(saved)
    assert teacher.fingerprint() == fp


def test_load_teacher_spec_and_missing_checkpoint(trained, monkeypatch):
    teacher = load_teacher(f"lit:{trained['ckpt']}")
    assert isinstance(teacher, LitTeacher) and teacher.fingerprint() == trained["teacher"].fingerprint()
    with pytest.raises(PipelineError, match="make lit-teacher"):
        load_teacher(f"lit:{trained['root'] / 'nope.pt'}")
    (trained["root"] / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="refusing LiT teacher checkpoint .*no checksum recorded"):
        LitTeacher.load(trained["root"] / "junk.pt")  # the checksum rule comes first (issue 35.1)
    monkeypatch.setenv("CLIPDISTILL_TRUST_UNCHECKED", "1")  # trusted, the junk is still refused in one line
    with pytest.raises(PipelineError, match="LiT teacher checkpoint .*junk.pt: ") as err:
        LitTeacher.load(trained["root"] / "junk.pt")
    assert "\n" not in str(err.value)


def test_cli_rerun_reuses_tower_features(trained, monkeypatch):
    root, ckpt = trained["root"], trained["ckpt"]
    caches = [feature_cache_path(ckpt, "train"), feature_cache_path(ckpt, "val")]
    mtimes = [os.stat(p).st_mtime_ns for p in caches]

    def no_towers(*args, **kwargs):
        raise AssertionError("towers loaded although the feature cache matches")

    monkeypatch.setattr(LitTowers, "__init__", no_towers)
    app = typer.Typer()
    app.command()(build_lit)
    # no --val-manifest: the sibling val.parquet is picked up, so the cached val features match too
    args = ["--manifest", str(root / "train.parquet"), "--out", str(ckpt), "--epochs", str(EPOCHS),
            "--lr", "3e-3", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "tower features reused" in result.output and "RSUM" in result.output
    assert [os.stat(p).st_mtime_ns for p in caches] == mtimes
    monkeypatch.undo()
    again = LitTeacher.load(ckpt)
    assert again.summary["feature_cache"] == "reused"
    # same seed and cached features -> the same heads as the first run
    assert again.fingerprint() == trained["teacher"].fingerprint()
    assert math.isclose(again.summary["val"]["rsum"], trained["summary"]["val"]["rsum"])



def _caches_reused_and_fresh(manifest, reused, fresh, out, dataset):
    """Stage-1 caches of ``manifest`` by the teacher that may reuse stored features and by the one that cannot;
    returns (reused cache, fresh cache, images the reusing teacher encoded, the two job summaries)."""
    from pipeline.features.cache import FeatureCache
    from pipeline.features.job import FeatureJob, run_feature_job

    encoded = {"n": 0}
    original = reused._encode_images

    def counting(pixels):
        encoded["n"] += len(pixels)
        return original(pixels)

    reused._encode_images = counting
    caches, summaries = [], []
    for name, teacher in (("reused", reused), ("fresh", fresh)):
        job = FeatureJob(manifest=manifest, dataset=dataset, split="train", out_dir=out / name,
                         num_workers=0, batch_size=8, dtype="float32")
        summaries.append(run_feature_job(job, teacher, progress=False))
        caches.append(FeatureCache(out / name))
    return caches[0], caches[1], encoded["n"], summaries


def test_stage1_reuses_build_lit_features_and_matches_encoding(trained, tmp_path):
    """teacher-features takes train/val embeddings from build-lit's tower features instead of encoding
    again; the cache must equal one made by encoding every image (checkpoint copied without the npz)."""
    import shutil

    root, ckpt = trained["root"], trained["ckpt"]
    lone = tmp_path / "alone" / "lit.pt"
    lone.parent.mkdir()
    shutil.copy(ckpt, lone)
    shutil.copy(f"{ckpt}.blake2b", f"{lone}.blake2b")  # a checkpoint travels with its checksum
    manifest = Manifest.read(root / "train.parquet")
    reused_teacher, fresh_teacher = LitTeacher.load(ckpt), LitTeacher.load(lone)
    known = reused_teacher.known_embeddings(manifest)
    assert known is not None and fresh_teacher.known_embeddings(manifest) is None
    assert len(known.image_ids) == 12 and len(known.captions) == 25  # the corrupt image is not known

    a, b, encoded, summaries = _caches_reused_and_fresh(manifest, reused_teacher, fresh_teacher, tmp_path, "shapes")
    for summary in summaries:
        assert summary.images == 12 and summary.rejects == 1  # corrupt image -> its caption rejected
    assert encoded == 0  # only the corrupt image was attempted, and it fails in decoding
    np.testing.assert_array_equal(a.image_ids, b.image_ids)
    np.testing.assert_allclose(a.image.to_array(), b.image.to_array(), atol=1e-5)
    np.testing.assert_allclose(a.text.to_array(), b.text.to_array(), atol=1e-5)
    np.testing.assert_allclose(a.image_norm, b.image_norm, rtol=1e-5)
    np.testing.assert_allclose(a.text_norm, b.text_norm, rtol=1e-5)


def test_build_lit_killed_with_sigkill_resumes_to_the_straight_heads(trained, tmp_path):
    """build-lit through the real CLI, SIGKILLed one step after its first epoch-end checkpoint (the training loop's
    testing switch), then run again: it resumes and ends with the heads of the uninterrupted run."""
    import shutil
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.common import paths
    from pipeline.teachers.lit_store import feature_cache_path
    from pipeline.train.loop import KILL_SWITCH
    from pipeline.train.state import load_checkpoint

    root, out = trained["root"], tmp_path / "lit.pt"
    for split in ("train", "val"):  # the cached tower features: no tower is loaded
        shutil.copy(feature_cache_path(trained["ckpt"], split), feature_cache_path(out, split))
    state = load_checkpoint(paths.last_checkpoint(trained["ckpt"].with_name("lit.run")))["state"]
    repo = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "stages.cli", "build-lit", "--manifest", str(root / "train.parquet"), "--out",
            str(out), "--epochs", str(EPOCHS), "--lr", "3e-3", "--batch-size", "8", "--workers", "0",
            "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    kill_at = state["global_step"] // state["epoch"] + 1
    killed = subprocess.run(args, cwd=repo, env={**env, KILL_SWITCH: str(kill_at)}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    stopped = load_checkpoint(paths.last_checkpoint(out.with_name("lit.run")))["state"]["global_step"]
    assert stopped == kill_at - 1 and not out.exists()
    again = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = LitTeacher.load(out)
    assert resumed.summary["resumed"] and resumed.fingerprint() == trained["teacher"].fingerprint()


def test_build_lit_writes_checksums_verify_checks(trained, tmp_path):
    """The heads and the tower features build-lit writes carry checksums; `clipdistill verify` reports them ok."""
    from pipeline.common import io
    from pipeline.features.cache.integrity import verify_tree

    ckpt = trained["ckpt"]
    features = sorted(ckpt.parent.glob(f"{ckpt.stem}.*-features.npz"))
    assert features and all(io.verify_file(p) is None for p in [ckpt, *features])
    found = {f.path: f.status for f in verify_tree(ckpt.parent)}
    assert found[ckpt] == "ok" and all(found[p] == "ok" for p in features)


def test_stage1_reuses_tower_features_of_the_same_files_under_another_manifest(trained, tmp_path):
    """A benchmark's train split that the teacher's corpus also holds (other ids, other rows, the files spelt through
    another path): its known images and captions come from build-lit's stored features, found by file and by text;
    only the image the corpus never held is encoded, and the cache equals one made by encoding everything."""
    import shutil

    root, ckpt = trained["root"], trained["ckpt"]
    (tmp_path / "new").mkdir()
    _draw("black", "square").save(tmp_path / "new" / "fresh.png")
    rows = [{"sample_id": 7, "image_id": 500, "image_path": "../images/3.png", "caption": "a red circle?", "split": "train"},
            {"sample_id": 8, "image_id": 501, "image_path": "../images/5.png", "caption": "a red triangle",
             "split": "train"},
            {"sample_id": 9, "image_id": 502, "image_path": "fresh.png", "caption": "a black square",
             "split": "train"}]
    manifest = Manifest.from_rows(rows, source="benchmark", image_root=root / "new")
    shutil.copytree(tmp_path / "new", root / "new", dirs_exist_ok=True)
    lone = tmp_path / "alone" / "lit.pt"
    lone.parent.mkdir()
    shutil.copy(ckpt, lone)
    shutil.copy(f"{ckpt}.blake2b", f"{lone}.blake2b")
    teacher, fresh_teacher = LitTeacher.load(ckpt), LitTeacher.load(lone)
    known = teacher.known_embeddings(manifest)
    assert sorted(known.image_ids.tolist()) == [500, 501]  # 3.png and 5.png; fresh.png was never encoded
    assert known.captions == ["a red triangle"]  # a stored caption; "a red circle?" is new text

    a, b, encoded, _ = _caches_reused_and_fresh(manifest, teacher, fresh_teacher, tmp_path, "bench")
    assert encoded == 1
    np.testing.assert_array_equal(a.image_ids, b.image_ids)
    np.testing.assert_allclose(a.image.to_array(), b.image.to_array(), atol=1e-5)
    np.testing.assert_allclose(a.text.to_array(), b.text.to_array(), atol=1e-5)


def test_image_size_is_the_checkpoints_and_part_of_the_fingerprint(trained, tmp_path):
    """build-lit --image-size: the towers read images at that size, the checkpoint remembers it, and the teacher's
    fingerprint (so its caches) differs from the 224 px teacher's."""
    root = trained["root"]
    ckpt = tmp_path / "lit-64.pt"
    summary = train_lit_heads(root / "train.parquet", ckpt, val_manifest=root / "val.parquet", epochs=2, lr=3e-3,
                              batch_size=8, num_workers=0, progress=False, image_size=64)
    small = LitTeacher.load(ckpt)
    assert summary["image_size"] == 64 and small.heads.image_size == 64
    assert small.image_transform()(_draw("red", "circle")).shape == (3, 64, 64)
    assert trained["teacher"].image_transform()(_draw("red", "circle")).shape == (3, 224, 224)
    assert small.fingerprint_parts()["towers"] != trained["teacher"].fingerprint_parts()["towers"]


def test_features_found_by_file_come_only_from_intact_files_of_the_same_towers(trained, tmp_path, capsys):
    """The by-file search reads only stored features of the same towers (image size included) whose checksum holds;
    otherwise the teacher encodes (None), never uses another size's or a damaged file's features."""
    import shutil

    from pipeline.teachers.lit import towers_fingerprint_parts
    from pipeline.teachers.lit_store import stored_tower_features

    root, ckpt = trained["root"], trained["ckpt"]
    copy = tmp_path / "copy" / "lit.pt"
    copy.parent.mkdir()
    for name in (ckpt.name, f"{ckpt.stem}.train-features.npz"):
        for suffix in ("", ".blake2b"):
            shutil.copy(ckpt.parent / f"{name}{suffix}", copy.parent / f"{name}{suffix}")
    rows = [{"sample_id": 1, "image_id": 900, "image_path": "images/4.png", "caption": "a green circle",
             "split": "train"},
            {"sample_id": 2, "image_id": 901, "image_path": "images/6.png", "caption": "never stored", "split": "train"}]
    manifest = Manifest.from_rows(rows, source="another view of the train images", image_root=root)
    found = stored_tower_features(copy, manifest, towers_fingerprint_parts())
    assert sorted(found.image_ids.tolist()) == [900, 901] and found.captions.tolist() == ["a green circle"]
    assert stored_tower_features(copy, manifest, towers_fingerprint_parts(64)) is None  # other towers' input
    features = copy.parent / f"{ckpt.stem}.train-features.npz"
    data = bytearray(features.read_bytes())
    data[len(data) // 2] ^= 0xFF
    features.write_bytes(bytes(data))
    assert stored_tower_features(copy, manifest, towers_fingerprint_parts()) is None
    assert "differs from its checksum" in capsys.readouterr().out
