"""Cached augmented views (issue 13) through the real commands: stage 1 stores K seeded crops per image with
their parameters; stage 2 replays a recorded crop for the student, whose input then holds the pixels the
teacher embedded for that view (fed to the teacher, it reproduces the cached target)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.common.errors import PipelineError
from pipeline.data.images import load_rgb
from pipeline.data.manifest import Manifest
from pipeline.distill.data import AlignedRows, PairDataset, ViewReplay
from pipeline.features.cache import FeatureCache
from pipeline.features.views import (
    ViewSpec, pick_view, render_view, student_view_transform, teacher_view_transform,
)
from pipeline.teachers import load_teacher
from tests.gen_cache import dual_teacher, make_dataset
from tests.test_distill import cli, distill_args, final_weights
from tests.test_ensemble import run


def test_view_parameters_are_seeded_boxes_and_a_smaller_count_is_a_prefix():
    ten, three = ViewSpec(10, seed=4).params(123), ViewSpec(3, seed=4).params(123)
    assert ten.shape == (10, 5) and np.array_equal(ten[:3], three)
    assert np.array_equal(ten, ViewSpec(10, seed=4).params(123))  # a function of (seed, image id, index)
    assert not np.array_equal(ten, ViewSpec(10, seed=5).params(123))
    x0, y0, x1, y1, flip = ten.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 1 + 1e-6).all() and (y1 <= 1 + 1e-6).all()
    area = (x1 - x0) * (y1 - y0)
    assert (area >= 0.35 * 0.74).all() and (flip == 0).all()  # area from the scale range (ratio clipping aside)
    assert ViewSpec(40, flip=True).params(1)[:, 4].sum() > 5
    with pytest.raises(PipelineError, match="view-scale"):
        ViewSpec(2, scale=(0.0, 1.0))


def test_render_view_crops_the_recorded_box_and_flips():
    from PIL import Image

    img = Image.new("RGB", (100, 50), "white")
    img.paste((255, 0, 0), (0, 0, 50, 50))  # left half red
    left = np.asarray(render_view(img, np.array([0, 0, 0.5, 1, 0], np.float32), 8))
    assert (left[..., 1] < 10).all()  # only red
    flipped = np.asarray(render_view(img, np.array([0.25, 0, 0.75, 1, 1], np.float32), 8))
    assert flipped[:, -1, 1].max() < 10 and flipped[:, 0, 1].min() > 245  # red now on the right


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A shapes dataset, a tiny trained student as the teacher (dual:), and its 3-view cache."""
    root = tmp_path_factory.mktemp("views")
    data = make_dataset(root / "data", n_images=30)
    export, printed = dual_teacher(root, data, "--views", 3)
    spec = f"dual:{export}"
    assert "train: " in printed and "x 3 views" in printed.split("train: ")[1].splitlines()[0]
    assert "val: " in printed and " x 3 views" not in printed.split("val: ")[1].splitlines()[0]
    assert FeatureCache(root / "cache" / "val").meta.views == 0  # only the training split is replayed
    return root, data, spec


def test_stage1_stores_views_whose_replayed_input_reproduces_the_target(world):
    root, data, spec = world
    cache = FeatureCache(root / "cache" / "train")
    m = Manifest.read(data / "train.parquet")
    assert cache.view_count == 3 and cache.view_params.shape == (len(cache.image), 3, 5)
    assert np.array_equal(cache.view_params[0], ViewSpec(3).params(int(cache.image_ids[0])))
    teacher = load_teacher(spec, device="cpu")
    ids, paths = m.unique_images()
    # the student's replay input for (image 2, view 1), through the training dataset itself
    rows = AlignedRows(ids, ids, ["x"] * len(ids), [m.resolve(p) for p in paths], cache.image_rows(ids),
                       np.zeros(len(ids), np.int64), np.zeros(len(ids), np.int64), 0)
    student = student_view_transform(teacher.model.transform_settings)
    assert student == teacher_view_transform(teacher)  # this student is the teacher: identical inputs
    replay = ViewReplay(student, 3, cache.view_params[rows.image_rows])
    ds = PairDataset(rows, None, seed=7, views=replay)
    i, pixels, err, view = ds[(2, 2)]  # (epoch, index)
    assert err is None and view == pick_view(7, 2, 2, 3)
    expected = student(load_rgb(rows.locations[2]), cache.view_params[rows.image_rows[2], view])
    pixels = ds.batcher([pixels])[0]  # the loader's batch op on the item's uint8 crop
    assert torch.equal(pixels, expected)
    got = teacher.encode_images(pixels[None]).numpy()[0]
    target = cache.views.gather(cache.view_rows(rows.image_rows[[2]], np.array([view])))[0]
    np.testing.assert_allclose(got, target, atol=1e-5)
    # the views differ from each other and from the whole image's embedding
    all_views = cache.views.gather(cache.view_rows(np.repeat(rows.image_rows[2], 3), np.arange(3)))
    assert np.abs(all_views[0] - all_views[1]).max() > 1e-3
    assert np.abs(all_views[0] - cache.image.gather(rows.image_rows[[2]])[0]).max() > 1e-3


def test_a_cache_with_other_views_is_refused_on_resume_and_a_teacher_without_preprocessing(world, tmp_path):
    root, data, spec = world
    r = run("teacher-features", "--teacher", spec, "--manifest-dir", data, "--out", root / "cache", "--views", 2,
            "--dtype", "float32", "--workers", "0", "--no-progress")
    assert r.returncode != 0 and "views" in r.stderr and "Traceback" not in r.stderr
    r = run("teacher-features", "--teacher", f"ensemble:{spec}+{spec}", "--manifest-dir", data, "--out",
            tmp_path / "c", "--views", 2, "--no-progress")
    assert r.returncode != 0 and "--views needs a teacher whose preprocessing is known" in r.stderr
    r = run("teacher-features", "--teacher", spec, "--manifest-dir", data, "--out", tmp_path / "d", "--views", 2,
            "--view-splits", "trian", "--no-progress")
    assert r.returncode != 0 and "--view-splits 'trian' names splits" in r.stderr and "Traceback" not in r.stderr
    assert "Traceback" not in r.stderr


def test_stage2_replays_views_and_checks_the_count(world, tmp_path):
    root, data, _ = world
    shapes = (data, root / "cache")
    runs = tmp_path / "runs"
    ok = cli(distill_args(shapes, runs, "v", "data.views=2", "optim.epochs=1", "max_steps=2"), stdout=-1, text=True)
    out, _ = ok.communicate(timeout=300)
    assert ok.returncode == 0, out
    assert final_weights(runs / "v")["state"]["global_step"] == 2
    assert "replays one of the first 2 of the cache's 3 cached teacher views" in out, out
    bad = cli(distill_args(shapes, runs, "w", "data.views=5"), stdout=-1, stderr=-2, text=True)
    out, _ = bad.communicate(timeout=120)
    assert bad.returncode != 0 and "holds 3 views per image" in out and "Traceback" not in out, out


def test_training_replays_the_pixels_stage1_encoded_with_preload_and_thumbnail_on(world, tmp_path):
    """Through the trainer's own loader: preloading on, and the shapes (40 px) larger than the preload size
    (1.15 x the student's 32 px), so a crop of the downsized copy would not be the teacher's pixels."""
    from tests.test_distill import settings
    from tests.test_transfer import _objective

    root, data, spec = world
    obj = _objective(tmp_path, *settings((data, root / "cache"), tmp_path / "runs"), "data.views=2",
                     "data.preload=true")
    assert "preloaded into RAM" in obj.dataset.preload_summary and obj.dataset.preload_size < 40
    stage1 = teacher_view_transform(load_teacher(spec, device="cpu"))  # what teacher-features fed the teacher
    cache = FeatureCache(root / "cache" / "train")
    checked = 0
    for batch in obj.epoch_batches(1, 0):
        for j, row in enumerate(batch.rows.tolist()):
            view = int(batch.views[j])
            assert 0 <= view < 2
            params = cache.view_params[obj.rows.image_rows[row], view]
            expected = stage1(load_rgb(obj.rows.locations[row]), params)
            assert torch.equal(batch.pixels[j], expected), f"row {row} view {view}: not the pixels stage 1 encoded"
            checked += 1
    assert checked >= 16
    # streamed from disk: the same pixels
    streamed = _objective(tmp_path / "s", *settings((data, root / "cache"), tmp_path / "runs"), "data.views=2",
                          "data.preload=false")
    first = next(iter(streamed.epoch_batches(1, 0)))
    assert torch.equal(first.pixels, next(iter(obj.epoch_batches(1, 0))).pixels)
