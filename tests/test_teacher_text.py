"""A student whose text side is the teacher's (issue 36.2): only its image tower trains, against the cached caption
embeddings; its export carries the teacher's text tower, so stage 3 searches its images against the teacher's
caption embeddings."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from pipeline.common import config as cfgio
from pipeline.common.distributed import DistEnv
from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest
from pipeline.distill.trainer import DistillConfig, DistillObjective, train
from pipeline.features.cache import FeatureCache
from pipeline.retrieval.evaluate import evaluate_student
from pipeline.retrieval.report import notes, speed_table
from pipeline.students.export import load_student_model
from tests.clirun import clipdistill as run
from tests.gen_cache import dual_teacher, make_cache, make_dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shapes data, a tiny dual encoder trained on its pairs (the teacher) and the teacher's cache."""
    root = tmp_path_factory.mktemp("teacher-text")
    data = make_dataset(root / "data", n_images=24)
    export, _ = dual_teacher(root, data)
    return root, data, export


def _config(root, data, cache, teacher_text, name="image-only", *more) -> DistillConfig:
    return cfgio.load(DistillConfig, None, [
        f"data.manifest_dir={data}", f"data.cache_dir={cache}", f"runs_dir={root / 'runs'}", "student=tiny",
        "optim.batch_size=4", "optim.epochs=1", "queue.size=16", "data.workers=0", "max_steps=3",
        f"teacher_text={teacher_text}", f"name={name}", *more])


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_step_runs_no_text_forward_and_trains_only_the_image_tower(world, tmp_path):
    root, data, export = world
    objective = DistillObjective(_config(root, data, root / "cache", f"dual:{export}"), tmp_path / "run",
                                 torch.device("cpu"), DistEnv())
    model = objective.model
    assert all(not p.requires_grad for p in [*model.text_tower.parameters(), *model.text_proj.parameters()])
    assert all(p.requires_grad for p in model.image_tower.parameters())

    def refuse(*args, **kwargs):
        raise AssertionError("the text tower ran in training")

    model.text_tower.forward = refuse
    objective.clock = lambda name: contextlib.nullcontext()
    objective.epoch_batches(0, 0)
    out = objective.step(next(iter(objective.loader)), 0)
    out.total.backward()
    assert model.image_proj.weight.grad is not None and model.text_proj.weight.grad is None


def test_the_export_carries_the_teachers_text_side_and_eval_searches_against_it(world):
    root, data, export = world
    train(_config(root, data, root / "cache", f"dual:{export}"), progress=False)
    student, meta = load_student_model(root / "runs" / "image-only" / "export" / "student.pt")
    teacher, _ = load_student_model(export)
    assert _same(student.text_tower, teacher.text_tower) and _same(student.text_proj, teacher.text_proj)
    assert not _same(student.image_tower, teacher.image_tower)  # its own (another preset's init, then trained)
    assert meta["text_side"]["from"] == f"dual:{export}"
    assert meta["text_side"]["fingerprint"] == FeatureCache(root / "cache" / "test").meta.teacher_fingerprint
    # its caption embeddings are the teacher's cached ones
    cache, manifest = FeatureCache(root / "cache" / "test"), Manifest.read(data / "test.parquet")
    captions = [str(c) for c in manifest.column("caption")[:5]]
    mine = student.encode_text(student.tokenizer(captions)).detach().numpy()
    cached = cache.texts_by_sample_id(manifest.column("sample_id")[:5])
    np.testing.assert_allclose(mine, cached, atol=1e-5)
    record = evaluate_student(root / "runs" / "image-only" / "export" / "student.pt", manifest, cache, speed=None)
    assert record["text_side"]["from"] == f"dual:{export}" and record["metrics"]["rsum"] > 0
    assert record["flops"]["image"] > 0 and record["flops"]["text"] > 0
    assert f"| {record['flops']['image'] / 1e9:.3f} / {record['flops']['text'] / 1e9:.3f} |" in speed_table([record])
    assert any("text side is the teacher's" in line for line in notes([record]))
    # the ONNX graphs carry the teacher's text side too
    r = run("export-onnx", root / "runs" / "image-only" / "export" / "student.pt")
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_text_side_that_did_not_make_the_cache_is_refused_in_one_line(world, tmp_path):
    root, data, export = world
    other = make_cache(data, tmp_path / "other", width=FeatureCache(root / "cache" / "train").width)
    with pytest.raises(PipelineError, match="was made by") as info:
        DistillObjective(_config(root, data, other, str(export)), tmp_path / "run", torch.device("cpu"), DistEnv())
    assert "\n" not in str(info.value)
    with pytest.raises(PipelineError, match="choose one"):
        DistillObjective(_config(root, data, root / "cache", str(export), "both", f"inherit.text_from={export}"),
                         tmp_path / "run2", torch.device("cpu"), DistEnv())


TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_an_open_clip_teachers_text_side_is_carried_too(world, tmp_path):
    """A user's CLIP teacher (openclip:ARCH/DIR, here a tiny random one saved as open_clip saves models): the
    student keeps its text transformer and projection, so its caption embeddings are the cached ones."""
    import json

    from pipeline.teachers.openclip import OpenClipTeacher

    root, data, _ = world
    torch.manual_seed(0)
    clip_dir = tmp_path / "tiny-clip"
    clip_dir.mkdir()
    torch.save(OpenClipTeacher("clipdistill-test-text-side", model_cfg=TINY_CLIP).model.state_dict(),
               clip_dir / "open_clip_pytorch_model.bin")
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    spec = f"openclip:tiny/{clip_dir}"
    r = run("teacher-features", "--teacher", spec, "--manifest-dir", data, "--out", tmp_path / "cache",
            "--dtype", "float32", "--workers", "0", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = _config(tmp_path, data, tmp_path / "cache", spec, "clip-text")
    objective = DistillObjective(cfg, tmp_path / "probe", torch.device("cpu"), DistEnv())
    assert not any(p.requires_grad for p in objective.model.text_tower.parameters())
    train(cfg, progress=False)
    export = tmp_path / "runs" / "clip-text" / "export" / "student.pt"
    student, meta = load_student_model(export)
    assert meta["text_side"]["from"] == spec and student.config.text.kind == "open_clip"
    cache, manifest = FeatureCache(tmp_path / "cache" / "test"), Manifest.read(data / "test.parquet")
    captions = [str(c) for c in manifest.column("caption")[:5]]
    mine = student.encode_text(student.tokenizer(captions)).detach().numpy()
    np.testing.assert_allclose(mine, cache.texts_by_sample_id(manifest.column("sample_id")[:5]), atol=1e-5)
    record = evaluate_student(export, manifest, cache, speed=None)
    assert record["text_side"]["from"] == spec and record["flops"]["text"] > 0
    r = run("export-onnx", export)  # the ONNX text graph is the CLIP text transformer
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_teacher_that_cannot_be_rebuilt_is_refused_in_one_line(world, tmp_path):
    root, data, _ = world
    with pytest.raises(PipelineError, match="cannot be rebuilt") as info:
        DistillObjective(_config(root, data, root / "cache", "hf:openai/clip-vit-base-patch32"), tmp_path / "run",
                         torch.device("cpu"), DistEnv())
    assert "\n" not in str(info.value)
