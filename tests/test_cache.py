"""Stage-1 cache: writing, memory-mapped reading, resume, sharding, rejects, refusal of mismatches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.features.cache import FeatureCache
from pipeline.common.errors import PipelineError
from pipeline.features.job import KILL_SWITCH, FeatureJob, run_feature_job
from pipeline.data.manifest import Manifest
from tests.fake_teacher import FakeTeacher

ROOT = Path(__file__).resolve().parents[1]


def make_manifest(tmp: Path, n_images: int = 23, captions: int = 3, corrupt: tuple = (), empty_caption=None):
    """Generated coloured PNGs, ``captions`` rows each; optional corrupt images and one empty caption."""
    img_dir = tmp / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_images):
        path = img_dir / f"{i:04d}.png"
        if i in corrupt:
            path.write_bytes(b"\x89PNG this is not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
        for c in range(captions):
            rows.append({"sample_id": i * 10 + c, "image_id": 1000 + i, "image_path": path.name,
                         "caption": f"picture {i} caption {c}", "split": "test"})
    manifest = Manifest.from_rows(rows, source="generated", image_root=str(img_dir))
    if empty_caption is not None:  # bypass from_rows validation: a manifest made by another tool
        t = manifest.table.to_pylist()
        t[empty_caption]["caption"] = "  "
        manifest = Manifest(manifest.table.from_pylist(t, schema=manifest.table.schema), "generated", str(img_dir))
    return manifest


def run(manifest, out, teacher=None, **kw):
    job = FeatureJob(manifest=manifest, dataset="gen", split="test", out_dir=out, num_workers=0,
                     batch_size=4, **{"shard_size": 5, **kw})
    return run_feature_job(job, teacher or FakeTeacher(), progress=False)


def test_embeddings_unit_norm_and_aligned(tmp_path):
    manifest = make_manifest(tmp_path)
    summary = run(manifest, tmp_path / "cache")
    assert summary.complete and summary.images == 23 and summary.texts == 69
    cache = FeatureCache(tmp_path / "cache", expect_fingerprint=FakeTeacher().fingerprint(),
                         expect_manifest_hash=manifest.content_hash)
    img = cache.image.to_array().astype(np.float32)
    txt = cache.text.to_array().astype(np.float32)
    assert img.dtype == np.float32 and cache.image.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=2e-3)
    # alignment: the cached row of a caption equals the teacher's embedding of that caption
    t = FakeTeacher()
    sid = 70 + 2  # image 7, caption 2
    expect = t.encode_texts(t.tokenize(["picture 7 caption 2"])).numpy()[0]
    np.testing.assert_allclose(cache.texts_by_sample_id([sid])[0], expect, atol=2e-3)
    assert cache.text_image_ids[cache.text_rows([sid])[0]] == 1007
    assert (cache.text_image_rows() == cache.image_rows(cache.text_image_ids)).all()


def test_cache_stores_raw_teacher_norms(tmp_path):
    manifest = make_manifest(tmp_path, n_images=7)
    run(manifest, tmp_path / "cache", dtype="float32")
    cache = FeatureCache(tmp_path / "cache")
    t = FakeTeacher()
    raw_txt = t._encode_texts(t.tokenize(["picture 3 caption 1"]))[0]
    row = cache.text_rows([31])[0]
    np.testing.assert_allclose(cache.text_norm[row], raw_txt.norm().item(), rtol=1e-5)
    # normalised row x stored norm == the teacher's raw embedding
    np.testing.assert_allclose(cache.text.gather([row])[0] * cache.text_norm[row], raw_txt.numpy(), rtol=1e-4)
    pixels = torch.stack([t.image_transform()(Image.open(tmp_path / "images" / "0004.png"))])
    raw_img = t._encode_images(pixels)[0]
    np.testing.assert_allclose(cache.image_norm[cache.image_rows([1004])[0]], raw_img.norm().item(), rtol=1e-5)
    assert cache.image_norm.shape == (7,) and cache.text_norm.shape == (21,)


def test_memmap_reads_equal_h5py_reads(tmp_path):
    run(make_manifest(tmp_path), tmp_path / "cache", dtype="float32")
    cache = FeatureCache(tmp_path / "cache")
    from_h5 = []
    for p in cache.shard_paths:
        with h5py.File(p, "r") as f:
            assert f["image"].chunks is None and f["image"].compression is None
            from_h5.append(f["image"][()])
    ref = np.concatenate(from_h5)
    assert isinstance(cache.image.parts[0], np.memmap)
    np.testing.assert_array_equal(cache.image.to_array(), ref)
    rows = np.random.default_rng(1).integers(0, len(ref), 50)
    np.testing.assert_array_equal(cache.image.gather(rows), ref[rows])  # multi-shard gather, unsorted
    ids = cache.image_ids[rows]
    np.testing.assert_array_equal(cache.images_by_id(ids), ref[rows])


def test_corrupt_image_and_empty_caption_are_rejected_valid_rows_kept(tmp_path):
    manifest = make_manifest(tmp_path, corrupt=(4,), empty_caption=0)
    summary = run(manifest, tmp_path / "cache")
    cache = FeatureCache(tmp_path / "cache")
    reasons = [r.reason for r in cache.rejects()]
    assert any("cannot decode" in r for r in reasons)
    assert "empty caption" in reasons
    assert len(reasons) == 3 + 1  # the corrupt image's three captions + one empty caption
    assert summary.rejects == 4
    assert 1004 not in set(cache.image_ids.tolist()) and len(cache.image) == 22
    expected = {r["sample_id"] for r in manifest.table.to_pylist() if r["image_id"] != 1004} - {0}
    assert set(cache.sample_ids.tolist()) == expected


def test_interrupted_run_resumes_to_identical_cache(tmp_path):
    manifest = make_manifest(tmp_path)
    run(manifest, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(manifest, tmp_path / "resumed", teacher=FakeTeacher(fail_after_batches=5))
    partial = sorted(p.name for p in (tmp_path / "resumed").glob("shard-*.h5"))
    assert 0 < len(partial) < 5
    (tmp_path / "resumed" / "shard-00004-of-00005.h5.tmp").write_bytes(b"half-written junk")  # an older writer's leftover
    again = run(manifest, tmp_path / "resumed")
    assert again.shards_skipped == partial and again.complete
    a, b = FeatureCache(tmp_path / "full"), FeatureCache(tmp_path / "resumed")
    np.testing.assert_array_equal(a.image.to_array(), b.image.to_array())
    np.testing.assert_array_equal(a.text.to_array(), b.text.to_array())
    np.testing.assert_array_equal(a.sample_ids, b.sample_ids)


def test_parallel_shard_processes_equal_single_process(tmp_path):
    manifest = make_manifest(tmp_path)
    run(manifest, tmp_path / "single")
    first = run(manifest, tmp_path / "split", shard_index=0, num_shards=2)
    assert not first.complete
    second = run(manifest, tmp_path / "split", shard_index=1, num_shards=2)
    assert second.complete and (tmp_path / "split" / "summary.json").exists()
    a, b = FeatureCache(tmp_path / "single"), FeatureCache(tmp_path / "split")
    np.testing.assert_array_equal(a.text.to_array(), b.text.to_array())


def test_reader_refuses_mismatches_and_incomplete_caches(tmp_path):
    manifest = make_manifest(tmp_path)
    run(manifest, tmp_path / "cache", shard_index=0, num_shards=2)
    with pytest.raises(PipelineError, match="incomplete"):
        FeatureCache(tmp_path / "cache")
    run(manifest, tmp_path / "cache", shard_index=1, num_shards=2)
    with pytest.raises(PipelineError, match="teacher"):
        FeatureCache(tmp_path / "cache", expect_fingerprint=FakeTeacher(seed=1).fingerprint())
    with pytest.raises(PipelineError, match="manifest"):
        FeatureCache(tmp_path / "cache", expect_manifest_hash="0" * 16)
    with pytest.raises(PipelineError, match="not in cache"):
        FeatureCache(tmp_path / "cache").images_by_id([123456])
    with pytest.raises(PipelineError, match="made differently"):  # another teacher into the same dir
        run(manifest, tmp_path / "cache", teacher=FakeTeacher(seed=3))
    with pytest.raises(PipelineError, match="no cache shards"):
        FeatureCache(tmp_path / "nothing")


KILL_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.test_cache import make_manifest, run
from pathlib import Path
run(make_manifest(Path({tmp!r})), Path({tmp!r}) / "killed")
"""


def test_process_killed_with_sigkill_resumes_identically(tmp_path):
    manifest = make_manifest(tmp_path)
    run(manifest, tmp_path / "full")
    # stage 1's testing switch: the job SIGKILLs itself right after publishing its 2nd shard (of 5), not a sleep
    env = {**os.environ, KILL_SWITCH: "2"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(root=str(ROOT), tmp=str(tmp_path))], env=env)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    done = sorted(p.name for p in (tmp_path / "killed").glob("shard-*.h5"))
    assert [n[:11] for n in done] == ["shard-00000", "shard-00001"], "the kill lands after the 2nd shard"
    run(manifest, tmp_path / "killed")
    a, b = FeatureCache(tmp_path / "full"), FeatureCache(tmp_path / "killed")
    np.testing.assert_array_equal(a.image.to_array(), b.image.to_array())
    np.testing.assert_array_equal(a.text.to_array(), b.text.to_array())
