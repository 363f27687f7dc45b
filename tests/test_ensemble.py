"""Teacher ensembles through the real commands: the ensemble's cache is the rule applied to its members' caches,
members of different widths included, and a student distils from it like from one teacher."""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest

from pipeline.data.manifest import Manifest
from pipeline.features.cache import FeatureCache
from pipeline.students.export import export_meta
from tests.clirun import clipdistill
from tests.gen_cache import make_dataset


def run(*args) -> subprocess.CompletedProcess:
    return clipdistill(*args)  # in this process (tests/clirun.py): no fresh interpreter per command


PAIRS_ONLY = ["--set", "losses.cd=false", "--set", "losses.fd=false", "--set", "losses.sd=false",
              "--set", "losses.hnd=false", "--set", "losses.pair=true", "--set", "data.cache_dir="]


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    data = make_dataset(root / "data", n_images=20)
    exports = []
    for name, width in (("a", 32), ("b", 48)):  # two small dual encoders of different widths
        result = run("distill", "--name", name, "--no-progress", "--set", f"data.manifest_dir={data}",
                     "--set", f"runs_dir={root / 'runs'}", "--set", "student=tiny", "--set", "optim.batch_size=4",
                     "--set", "optim.epochs=1", "--set", "data.workers=0", "--set", f"seed={width}",
                     "--set", f"student_overrides={{embed_dim: {width}}}", *PAIRS_ONLY)
        assert result.returncode == 0, result.stderr[-2000:]
        exports.append(root / "runs" / name / "export" / "student.pt")
    return root, data, exports


def cache_of(root, data, spec: str, name: str) -> FeatureCache:
    out = root / "cache" / name
    result = run("teacher-features", "--teacher", spec, "--manifest-dir", data, "--out", out, "--splits", "test",
                 "--dtype", "float32", "--workers", "0", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    return FeatureCache(out / "test", expect_manifest_hash=Manifest.read(data / "test.parquet").content_hash)


def test_ensemble_cache_is_the_rule_applied_to_its_members_caches(members, tmp_path):
    root, data, (a, b) = members
    ca, cb = cache_of(root, data, f"dual:{a}", "a"), cache_of(root, data, f"dual:{b}", "b")
    ce = cache_of(root, data, f"ensemble:dual:{a}+dual:{b}", "ab")
    assert (ca.width, cb.width, ce.width) == (32, 48, 80)
    ids, sids = ce.image_ids, ce.sample_ids
    for get_rows, ids_, block in (("image_rows", ids, "image"), ("text_rows", sids, "text")):
        parts = [getattr(c, block).gather(getattr(c, get_rows)(ids_)).astype(np.float64) for c in (ca, cb)]
        expect = np.concatenate(parts, axis=1) / math.sqrt(2)
        got = getattr(ce, block).gather(getattr(ce, get_rows)(ids_)).astype(np.float64)
        np.testing.assert_allclose(got, expect, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        # the ensemble's cosine similarity is the mean of the members' (what similarity losses read)
        np.testing.assert_allclose(got @ got.T, (parts[0] @ parts[0].T + parts[1] @ parts[1].T) / 2, atol=1e-5)
    fa, fb = ca.meta.teacher_fingerprint, cb.meta.teacher_fingerprint
    assert ce.meta.teacher_name == f"ensemble[{fa},{fb}]" and ce.meta.teacher_fingerprint not in (fa, fb)

    # a student distils from the ensemble's cache like from one teacher (projecting to its width)
    cache = root / "cache" / "ab-all"
    assert run("teacher-features", "--teacher", f"ensemble:dual:{a}+dual:{b}", "--manifest-dir", data,
               "--out", cache, "--workers", "0", "--no-progress").returncode == 0
    result = run("distill", "--name", "s", "--no-progress", "--set", f"data.manifest_dir={data}",
                 "--set", f"data.cache_dir={cache}", "--set", f"runs_dir={tmp_path}", "--set", "student=tiny",
                 "--set", "optim.batch_size=4", "--set", "optim.epochs=1", "--set", "data.workers=0",
                 "--set", "queue.size=8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "-> width 80" in result.stdout
    assert export_meta(tmp_path / "s" / "export" / "student.pt")["teacher_fingerprint"] == ce.meta.teacher_fingerprint


@pytest.mark.parametrize("spec, fragment", [
    ("ensemble:lit", "name two or more teacher specs"),
    ("ensemble:lit+ensemble:lit+lit", "cannot contain another ensemble"),
])
def test_bad_ensemble_specs_are_one_line_errors(members, spec, fragment):
    root, data, _ = members
    result = run("teacher-features", "--teacher", spec, "--manifest-dir", data, "--out", root / "bad",
                 "--no-progress")
    assert result.returncode == 2 and fragment in result.stderr and "Traceback" not in result.stderr
