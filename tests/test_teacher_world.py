"""The teacher's world through the real commands (issue 12): the corpus + benchmark splits, a teacher trained on
pairs alone (no cache), used as a ``dual:`` teacher by stage 1, and a student distilled from its cache."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.manifest import Manifest
from pipeline.features.cache import FeatureCache
from pipeline.students.export import export_meta, load_student_model
from tests.clirun import clipdistill
from tests.gen_cache import make_dataset
from tests.test_corpus import SQUARE, lock_for, npm_tarball
from tests.test_distill import ROOT

torch.set_num_threads(1)


def run(*args) -> subprocess.CompletedProcess:
    return clipdistill(*args)  # in this process (tests/clirun.py): no fresh interpreter per command


def emoji_names(n: int) -> list[str]:
    """The kebab-case CLDR names of the first ``n`` single-code-point emoji (what Iconify icons are called)."""
    import emoji

    names = [e["en"].strip(":").lower().replace("_", "-") for seq, e in emoji.EMOJI_DATA.items()
             if len(seq) == 1 and "en" in e]
    return sorted(set(names))[:n]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    bench = make_dataset(root / "bench", n_images=30)  # the benchmark: train/val/test manifests
    cache = root / "npm"
    names = emoji_names(40)
    npm_tarball(cache, "@iconify-json/noto", "2.0.0", "Apache-2.0", {n: SQUARE for n in names})
    npm_tarball(cache, "@iconify-json/twemoji", "1.0.0", "CC-BY-4.0", {n: SQUARE for n in names[:25]})
    out = root / "corpus"
    result = run("build-corpus", "--styles", "noto,twemoji", "--npm-cache", cache, "--npm-lock", lock_for(cache),
                 "--out", out, "--size", 24,
                 "--benchmark", bench)
    assert result.returncode == 0, result.stderr[-2000:]
    return bench, out, result.stdout


def test_world_splits_hold_the_corpus_and_the_benchmark_without_leaks(world):
    bench, out, stdout = world
    split = {s: Manifest.read(out / f"{s}.parquet") for s in ("train", "val", "test")}
    rows = {s: m.table.to_pylist() for s, m in split.items()}
    bench_rows = {s: Manifest.read(bench / f"{s}.parquet").table.to_pylist() for s in ("train", "val", "test")}
    corpus_paths = {r["image_path"] for s in ("train", "val") for r in rows[s] if r["image_path"].startswith("images/")}
    assert len(corpus_paths) == 40 + 25  # every icon of both styles, in train or val, none twice
    assert rows["val"] and all(r["image_path"].startswith("images/") for r in rows["val"])
    assert not {r["image_path"] for r in rows["val"]} & {r["image_path"] for r in rows["train"]}
    # the benchmark's test split, row for row (ids, captions, the same image files), and its train split in train
    key = lambda r: (r["sample_id"], r["image_id"], r["caption"])  # noqa: E731
    assert sorted(map(key, rows["test"])) == sorted(map(key, bench_rows["test"]))
    bench_file = {r["sample_id"]: Path(Manifest.read(bench / "test.parquet").resolve(r["image_path"])).resolve()
                  for r in bench_rows["test"]}
    assert all(Path(split["test"].resolve(r["image_path"])).resolve() == bench_file[r["sample_id"]]
               for r in rows["test"])
    train_ids = {r["sample_id"] for r in rows["train"]}
    assert {r["sample_id"] for r in bench_rows["train"]} <= train_ids
    held_out = {r["image_id"] for s in ("val", "test") for r in bench_rows[s]}
    assert not held_out & {r["image_id"] for r in rows["train"]}  # no benchmark val/test image is training data
    counts = json.loads((out / "summary.json").read_text())["splits"]
    assert counts["test"] == {"openmoji": {"images": len({r["image_id"] for r in bench_rows["test"]}),
                                           "pairs": len(bench_rows["test"])}}
    assert sum(c["pairs"] for c in counts["train"].values()) == len(rows["train"])
    assert set(counts["train"]) == {"noto", "twemoji", "openmoji"}
    assert "test         images/pairs: openmoji" in stdout


def test_teacher_from_pairs_then_dual_spec_then_a_student_from_its_cache(world, tmp_path):
    _, data, _ = world
    base = ["--set", f"data.manifest_dir={data}", "--set", f"runs_dir={tmp_path / 'runs'}", "--set", "student=tiny",
            "--set", "optim.batch_size=8", "--set", "optim.epochs=1", "--set", "data.workers=0", "--no-progress"]
    # Without a cache only teacher-free losses may be on: a one-line error naming the others.
    bad = run("distill", "--name", "bad", "--set", "data.cache_dir=", *base)
    assert bad.returncode == 2 and "losses ['cd', 'fd', 'hnd', 'sd'] need teacher targets" in bad.stderr
    assert "Traceback" not in bad.stderr
    pairs_only = ["--set", "losses.cd=false", "--set", "losses.fd=false", "--set", "losses.sd=false",
                  "--set", "losses.hnd=false", "--set", "losses.pair=true"]
    teacher = run("distill", "--config", ROOT / "configs" / "teacher-emoji.yaml", "--name", "teacher", *base,
                  *pairs_only, "--set", "data.cache_dir=")
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    assert "(no teacher)" in teacher.stdout
    export = tmp_path / "runs" / "teacher" / "export" / "student.pt"
    meta = export_meta(export)
    train = Manifest.read(data / "train.parquet")
    assert meta["teacher_fingerprint"] is None and meta["train_data"] == train.content_hash
    assert meta["recipe"]["student"] == "tiny" and meta["recipe"]["losses"]["pair"]

    # Stage 1 with the trained dual encoder as the teacher: its cache holds the model's own embeddings.
    cache = tmp_path / "cache"
    feats = run("teacher-features", "--teacher", f"dual:{export}", "--manifest-dir", data, "--out", cache,
                "--no-progress")
    assert feats.returncode == 0, feats.stderr[-2000:]
    model, _ = load_student_model(export)
    test = Manifest.read(data / "test.parquet")
    test_cache = FeatureCache(cache / "test", expect_manifest_hash=test.content_hash)
    ids, locations = test.unique_images()
    from pipeline.data.images import load_rgb

    with torch.no_grad():
        pixels = torch.stack([model.image_transform(train=False)(load_rgb(test.resolve(p))) for p in locations[:4]])
        direct = torch.nn.functional.normalize(model.image_features(pixels), dim=-1).numpy()
    cached = test_cache.image.gather(test_cache.image_rows(ids[:4])).astype(np.float32)
    np.testing.assert_allclose(cached, direct, atol=2e-3)  # the cache stores float16
    assert test_cache.meta.teacher_name.startswith("dual-tiny")

    # A student distilled from that cache records the dual teacher's fingerprint.
    student = run("distill", "--name", "student", *base, "--set", f"data.cache_dir={cache}", "--set", "queue.size=16")
    assert student.returncode == 0, student.stderr[-2000:]
    student_meta = export_meta(tmp_path / "runs" / "student" / "export" / "student.pt")
    assert student_meta["teacher_fingerprint"] == test_cache.meta.teacher_fingerprint


@pytest.mark.parametrize("spec, fragment", [("dual:", "needs the export's path"),
                                            ("dual:/no/such/export.pt", "/no/such/export.pt")])
def test_bad_dual_specs_are_one_line_errors(tmp_path, spec, fragment):
    bench = make_dataset(tmp_path / "bench", n_images=10)
    result = run("teacher-features", "--teacher", spec, "--manifest-dir", bench, "--out", tmp_path / "c",
                 "--no-progress")
    assert result.returncode == 2 and fragment in result.stderr and "Traceback" not in result.stderr
