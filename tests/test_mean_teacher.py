"""Mean-teacher adaptation (method.md section 3): EMA, momentum schedule, losses and bank against naive
references, the labelled split, start points, and the real CLI (kill + resume, export read by stage 3)."""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.common import config as cfgio
from pipeline.adapt.data import stream
from pipeline.adapt.start import frozen_towers, load_start, set_trainable
from pipeline.adapt.consistency import (
    EmbeddingBank, consistency_loss, contrastive_loss, drop_words, ema_update, draw_labelled_images, momentum_at,
)
from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest
from pipeline.adapt.trainer import AdaptConfig, batches_for, check_config, split_for, train
from pipeline.common.runlog import read_metrics
from pipeline.students import ImageTransform, build_student, export_student, get_preset, load_student_model
from pipeline.train.loop import KILL_SWITCH
from tests.gen_cache import make_cache, make_dataset

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 16  # the fake teacher's cache width, so the evaluator accepts the exports


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


# ---- EMA and its momentum -----------------------------------------------------------------------------


def test_momentum_schedule_endpoints_and_shape():
    total = 100
    ms = [momentum_at(s, total, 0.99, 1.0) for s in range(total + 1)]
    assert ms[0] == pytest.approx(0.99) and ms[-1] == pytest.approx(1.0)
    assert ms[50] == pytest.approx(0.995)  # cosine: half way at half time
    assert all(b >= a for a, b in zip(ms, ms[1:]))
    assert ms[10] - ms[0] < ms[55] - ms[45]  # slow at the ends, fastest in the middle
    assert momentum_at(500, total) == pytest.approx(1.0)  # clamped past the end
    assert momentum_at(7, 10, 0.9, 0.9) == pytest.approx(0.9)
    with pytest.raises(PipelineError):
        momentum_at(0, 10, 0.99, 0.9)


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def test_ema_update_matches_naive_formula():
    torch.manual_seed(0)
    student = _bn_net()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()(torch.randn(8, 4))  # moves the batch-norm statistics and the batch counter
    m = 0.9
    expected = {k: (m * v + (1 - m) * student.state_dict()[k]) if v.dtype.is_floating_point
                else student.state_dict()[k].clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, m)
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    assert int(teacher[1].num_batches_tracked) == 1
    frozen = copy.deepcopy(teacher.state_dict())
    ema_update(teacher, student, 1.0)  # momentum 1: the teacher does not move
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())
    ema_update(teacher, student, 0.0)  # momentum 0: the teacher becomes the student
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in teacher.state_dict().items())


# ---- losses -------------------------------------------------------------------------------------------


def _unit(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_contrastive_loss_matches_naive_reference():
    img, txt = _unit(6, seed=1), _unit(6, seed=2)
    ids = torch.tensor([0, 0, 1, 2, 2, 3])  # rows 0/1 and 3/4 are sibling captions of one image
    hashes = torch.tensor([10, 11, 12, 13, 14, 12])  # rows 2 and 5: identical captions of two images
    tau = 0.1

    def direction(anchor, other, masked):
        total = 0.0
        for i in range(len(anchor)):
            kept = [j for j in range(len(other)) if j == i or not masked(i, j)]
            logits = {j: float(anchor[i] @ other[j]) / tau for j in kept}
            total += -(logits[i] - math.log(sum(math.exp(v) for v in logits.values())))
        return total / len(anchor)

    def masked(i, j):
        return bool(ids[i] == ids[j] or hashes[i] == hashes[j])

    want = 0.5 * (direction(img, txt, masked) + direction(txt, img, masked))
    got = contrastive_loss(img, txt, ids, tau, hashes)
    assert float(got) == pytest.approx(want, rel=1e-5)
    unmasked = 0.5 * (direction(img, txt, lambda i, j: False) + direction(txt, img, lambda i, j: False))
    assert abs(unmasked - want) > 1e-3  # the masking changes the loss on this batch


def test_consistency_loss_matches_naive_reference_and_gradient():
    s, t, bank = _unit(4, seed=3).requires_grad_(), _unit(4, seed=4), _unit(7, seed=5).requires_grad_()
    ts, tt = 0.1, 0.04
    loss, info = consistency_loss(s, t, bank, ts, tt)
    want, entropy, p_all, q_all = 0.0, 0.0, [], []
    for b in range(4):
        zs = [math.exp(float(s[b].detach() @ bank[k].detach()) / ts) for k in range(7)]
        zt = [math.exp(float(t[b] @ bank[k].detach()) / tt) for k in range(7)]
        p = [z / sum(zs) for z in zs]
        q = [z / sum(zt) for z in zt]
        want += -sum(qk * math.log(pk) for qk, pk in zip(q, p)) / 4
        entropy += -sum(qk * math.log(qk) for qk in q) / 4
        p_all.append(p)
        q_all.append(q)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    assert info["teacher_entropy"] == pytest.approx(entropy, rel=1e-4)
    loss.backward()
    # d loss / d s_b = sum_k (p_bk - q_bk) bank_k / (tau_s B); the bank and the teacher get no gradient
    expected = (torch.tensor(p_all) - torch.tensor(q_all)) @ bank.detach() / (ts * 4)
    torch.testing.assert_close(s.grad, expected, atol=1e-5, rtol=1e-4)
    assert bank.grad is None


def test_drop_words_keeps_at_least_one_word():
    rng = np.random.default_rng(0)
    assert drop_words("one", 0.9, rng) == "one"
    out = [drop_words("a b c d", 0.99, rng) for _ in range(20)]
    assert all(len(o.split()) >= 1 for o in out) and any(o != "a b c d" for o in out)
    assert drop_words("a b c d", 0.0, rng) == "a b c d"


# ---- bank ---------------------------------------------------------------------------------------------


def test_bank_is_a_fifo_of_the_last_entries():
    bank, naive = EmbeddingBank(5, 2), []
    for n in (2, 2, 3, 7, 1):
        x = torch.arange(len(naive) * 2, (len(naive) + n) * 2, dtype=torch.float32).view(n, 2)
        naive += [tuple(r) for r in x.tolist()]
        bank.push(x)
        kept = sorted(tuple(r) for r in bank.active().tolist())
        assert kept == sorted(naive[-5:]) and len(bank) == min(5, len(naive))
    clone = EmbeddingBank(5, 2)
    clone.load_state_dict(bank.state_dict())
    assert torch.equal(clone.active(), bank.active()) and int(clone.ptr) == int(bank.ptr)


# ---- labelled split and step batches ------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Generated shapes dataset, its fake-teacher cache (for the evaluator) and a tiny student export."""
    root = tmp_path_factory.mktemp("mt")
    manifests = make_dataset(root)
    cache = make_cache(manifests, root / "cache", width=WIDTH)
    torch.manual_seed(0)
    start = export_student(build_student(get_preset("tiny", WIDTH)), None, root / "start" / "student.pt",
                           meta={"run": "start"})
    return {"manifests": manifests, "cache": cache, "start": start, "root": root}


def _cfg(env, runs: Path, *extra: str) -> list[str]:
    return [f"start=student:{env['start']}", f"data.manifest_dir={env['manifests']}", f"runs_dir={runs}",
            "data.workers=0", "optim.batch_size=4", "optim.unlabelled_batch_size=4", "optim.epochs=2",
            "optim.steps_per_epoch=3", "optim.lr=1e-3", "consistency.bank_size=16",
            "consistency.bank_min_fill=8", "labelled_fraction=0.3", "log_every=1", "checkpoint_every=2",
            "eval_batch_size=16", *extra]


def test_labelled_split_is_deterministic_disjoint_and_by_image(env):
    manifest = Manifest.read(env["manifests"] / "train.parquet")
    ids = manifest.column("image_id")
    n_images = len(np.unique(ids))

    def split(*sets):
        return split_for(manifest, cfgio.load(AdaptConfig, None, list(sets)))

    a, b = split("labelled_fraction=0.3"), split("labelled_fraction=0.3")
    assert np.array_equal(a.labelled_ids, b.labelled_ids) and np.array_equal(a.labelled_rows, b.labelled_rows)
    assert len(a.labelled_ids) == round(0.3 * n_images)
    assert not np.array_equal(a.labelled_ids, split("labelled_fraction=0.3", "seed=1").labelled_ids)
    # by image: a row is labelled exactly when its image is, so every caption of a labelled image is
    row_ids = a.image_ids[a.row_image]
    assert set(np.flatnonzero(np.isin(row_ids, a.labelled_ids))) == set(a.labelled_rows)
    assert a.summary()["pairs"] == len(manifest)
    # consistency on the unlabelled part only: disjoint from the labelled images, together all of them
    u = split("labelled_fraction=0.3", "consistency.data=unlabelled")
    cons_ids = set(u.image_ids[u.cons_images].tolist())
    assert cons_ids.isdisjoint(u.labelled_ids.tolist())
    assert cons_ids | set(u.labelled_ids.tolist()) == set(np.unique(ids).tolist())
    assert set(u.cons_rows).isdisjoint(u.labelled_rows)
    assert len(u.cons_rows) + len(u.labelled_rows) == len(manifest)
    # a smaller fraction's labelled images are among a larger one's (same seed)
    small, half, full = (set(draw_labelled_images(ids, f, 0)) for f in (0.1, 0.5, 1.0))
    assert small <= half <= full
    assert len(draw_labelled_images(ids, 0.001, 0)) == 1
    with pytest.raises(PipelineError, match="labelled_fraction"):
        draw_labelled_images(ids, 0.0, 0)


def test_unpaired_rows_are_consistency_data_only(env):
    """The domain's unlabelled images (image-only rows) and unpaired captions (caption-only rows) join the
    consistency streams; labelled images are drawn among images with captions; the pairs' draw is unchanged."""
    manifest = Manifest.read(env["manifests"] / "train.parquet")
    rows = manifest.table.to_pylist()
    extra_img = {**rows[0], "sample_id": 70000, "image_id": 999, "caption": None, "unpaired": True}
    extra_caps = [{"sample_id": 80000 + k, "image_id": 0, "image_path": None, "caption": f"a lonely caption {k}",
                   "split": "train", "unpaired": True} for k in range(3)]
    mixed = Manifest.from_rows(rows + [extra_img] + extra_caps, source="t", image_root=manifest.image_root)
    assert mixed.image_only_mask().sum() == 1 and mixed.caption_only_mask().sum() == 3
    cfg = cfgio.load(AdaptConfig, None, ["labelled_fraction=0.3"])
    plain, split = split_for(manifest, cfg), split_for(mixed, cfg)
    assert np.array_equal(plain.labelled_ids, split.labelled_ids)  # the draw among paired images is unchanged
    assert 999 in split.image_ids.tolist() and 999 not in split.labelled_ids.tolist()
    lonely = [i for i, c in enumerate(split.captions) if c.startswith("a lonely caption")]
    assert len(lonely) == 3 and (split.row_image[lonely] == -1).all()
    assert set(lonely) <= set(split.cons_rows.tolist()) and not set(lonely) & set(split.labelled_rows.tolist())
    u = split_for(mixed, cfgio.load(AdaptConfig, None, ["labelled_fraction=0.3", "consistency.data=unlabelled"]))
    assert set(lonely) <= set(u.cons_rows.tolist())
    assert split.image_ids.tolist().index(999) in split.cons_images.tolist()


def test_stream_is_a_permutation_per_pass_and_chunk_invariant():
    whole = stream(7, 0, 21, seed=3, tag=1)
    for p in range(3):
        assert sorted(whole[7 * p : 7 * p + 7]) == list(range(7))
    parts = [stream(7, s, 4, seed=3, tag=1) for s in range(0, 20, 4)] + [stream(7, 20, 1, seed=3, tag=1)]
    chunks = np.concatenate(parts)
    assert np.array_equal(whole, chunks)  # what a resumed run draws at a step equals the straight run's
    assert not np.array_equal(whole[:7], whole[7:14])


def test_step_batches_are_a_function_of_the_step(env):
    manifest = Manifest.read(env["manifests"] / "train.parquet")
    cfg = cfgio.load(AdaptConfig, None, _cfg(env, env["root"] / "unused"))
    split = split_for(manifest, cfg)
    model, _ = load_student_model(env["start"])
    transform = ImageTransform(model.transform_settings, train=True)
    one, again = batches_for(split, transform, cfg)[5], batches_for(split, transform, cfg)[5]
    for key in ("rows", "pixels", "u_student", "u_teacher", "u_rows"):
        assert torch.equal(one[key], again[key]), key
    assert not torch.equal(one["u_student"], one["u_teacher"])  # two differently augmented views
    assert not torch.equal(one["pixels"], batches_for(split, transform, cfg)[6]["pixels"])
    assert set(one["rows"].tolist()) <= set(split.labelled_rows.tolist())


# ---- the real CLI: kill, resume, export read by stage 3 -----------------------------------------------


def _cli(args: list[str], kill_at: int | None = None) -> subprocess.Popen:
    """The CLI in a subprocess; ``kill_at``: it SIGKILLs itself right after that step (the training loop's testing
    switch, pipeline.train.loop.KILL_SWITCH)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if kill_at is not None:
        env[KILL_SWITCH] = str(kill_at)
    return subprocess.Popen([sys.executable, "-m", "stages.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _adapt_args(settings: list[str], name: str) -> list[str]:
    out = ["adapt", "--name", name, "--no-progress"]
    for s in settings:
        out += ["--set", s]
    return out


def test_cli_run_killed_and_resumed_equals_straight_run_and_export_evaluates(env, tmp_path):
    from pipeline.features.cache import FeatureCache
    from pipeline.retrieval.evaluate import evaluate_student

    runs = tmp_path / "runs"
    settings = _cfg(env, runs)
    ckpt = runs / "killed" / "checkpoints" / "last.pt"
    straight = _cli(_adapt_args(settings, "straight"))  # the two processes share the 2 cores
    # killed after step 5: one step past the checkpoint at step 4, so the resume redoes a lost step
    killed = _cli(_adapt_args(settings, "killed"), kill_at=5)
    out, _ = killed.communicate(timeout=240)
    assert killed.returncode == -signal.SIGKILL, out[-2000:]
    assert ckpt.exists(), out[-2000:]
    assert not (runs / "killed" / "export" / "student.pt").exists(), "the kill must land before the end"
    stopped_at = torch.load(ckpt, weights_only=True)["state"]["global_step"]
    # resumed in this process (the flag only reaches train(resume=True)); one thread, like the CLI runs
    train(cfgio.load(AdaptConfig, None, settings + ["name=killed"]), resume=True, progress=False)
    out, _ = straight.communicate(timeout=240)
    assert straight.returncode == 0, out[-3000:]
    assert "export: " in out

    a = torch.load(runs / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert stopped_at < a["state"]["global_step"] == 6 and a["state"] == b["state"]
    for part in ("model", "teacher", "image_bank", "text_bank"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key} differs after resume"
    steps = [r["step"] for r in read_metrics(runs / "killed", "train")]
    assert steps == list(range(1, 7))  # no step lost or logged twice
    assert [r["epoch"] for r in read_metrics(runs / "killed", "val")] == [-1, 0, 1]
    train_log = read_metrics(runs / "killed", "train")
    assert any(r["image_consistency"] == r["image_consistency"] for r in train_log)  # not NaN: it ran
    assert train_log[-1]["momentum"] > train_log[0]["momentum"]

    # the export is the best epoch's EMA teacher, and stage 3 evaluates it against the cache
    export = runs / "killed" / "export" / "student.pt"
    model, meta = load_student_model(export)
    best = torch.load(runs / "killed" / "checkpoints" / "best.pt", weights_only=True)
    assert meta["mode"] == "mean_teacher" and meta["exported"] == "ema" and meta["labelled_fraction"] == 0.3
    for key, value in model.state_dict().items():
        assert torch.equal(value, best["teacher"][key]), key
    test = Manifest.read(env["manifests"] / "test.parquet")
    record = evaluate_student(export, test, FeatureCache(env["cache"] / "test"), speed=None, workers=0)
    assert record["name"] == "killed" and 0 <= record["metrics"]["rsum"] <= 600
    assert record["n_images"] == len(np.unique(test.column("image_id")))


def test_supervised_mode_trains_only_what_it_is_told_without_a_teacher(env, tmp_path):
    cfg = cfgio.load(AdaptConfig, None, _cfg(env, tmp_path, "mode=supervised", "max_steps=3",
                                             "data.val_split=none", "trainable=projections"))
    result = train(cfg, progress=False)
    ckpt = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert "teacher" not in ckpt and ckpt["state"]["global_step"] == 3
    log = read_metrics(result.run_dir, "train")
    assert "image_consistency" not in log[0] and all(r["contrastive"] > 0 for r in log)
    adapted, meta = load_student_model(result.export_path)
    start = load_student_model(env["start"])[0].state_dict()
    assert meta["exported"] == "student" and meta["mode"] == "supervised"
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, start[k])}
    assert changed == {"image_proj.weight", "text_proj.weight"}  # towers frozen, heads trained
    with pytest.raises(PipelineError, match="already has checkpoints"):
        train(cfg, progress=False)


def test_bad_config_and_start_points_are_one_line_errors(env, tmp_path):
    for sets, match in ((["mode=fancy"], "mode must be"), (["labelled_fraction=0"], "labelled_fraction"),
                        (["export_model=x"], "export_model"), (["trainable=heads"], "trainable"),
                        (["augment.crop_scale=[0.9, 0.5]"], "crop_scale"), (["ema.m0=1.5"], "m0"),
                        (["consistency.bank_min_fill=99"], "never start")):
        with pytest.raises(PipelineError, match=match):
            check_config(cfgio.load(AdaptConfig, None, _cfg(env, tmp_path, *sets)))
    for spec, match in (("hf:openai/clip-vit-base-patch32", "not supported"), ("nope:x", "unknown start"),
                        (f"student:{tmp_path / 'missing.pt'}", "not found"), ("openclip:", "architecture")):
        with pytest.raises(PipelineError, match=match):
            load_start(spec)
    with pytest.raises(PipelineError, match="unlabelled"):
        train(cfgio.load(AdaptConfig, None, _cfg(env, tmp_path, "labelled_fraction=1",
                                                 "consistency.data=unlabelled")), progress=False)


# ---- start points: the lit teacher and open_clip models as trainable students ------------------------


def _images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]


CAPTIONS = ["a red square", "grinning face with big eyes", "x"]


def _embed(encoder) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.stack([encoder.image_transform()(im) for im in _images()])
    return encoder.encode_images(pixels), encoder.encode_texts(encoder.tokenize(CAPTIONS))


def test_lit_start_embeds_like_the_lit_teacher(tmp_path):
    from pipeline.students import StudentEncoder
    from pipeline.teachers.lit import LitHeads, LitTeacher, save_heads

    torch.manual_seed(0)
    heads = LitHeads(32)
    heads.set_input_stats(torch.randn(40, 1280) * 3 + 1, torch.randn(40, 384) * 0.2 + 0.1)
    path = save_heads(tmp_path / "lit.pt", heads)
    start = load_start(f"lit:{path}")
    teacher = LitTeacher.load(path)
    assert start.meta["teacher_fingerprint"] == teacher.fingerprint()  # stage 3 matches it with the cache
    # the export an adapted copy is written as (what stage 3 loads) still embeds like the teacher
    exported = load_student_model(export_student(start.model, None, tmp_path / "lit-student.pt"))[0]
    for got, want in zip(_embed(StudentEncoder(exported)), _embed(teacher)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    counts = set_trainable(start.model, "projections")
    assert counts["trainable"] == sum(p.numel() for m in (start.model.image_proj, start.model.text_proj)
                                      for p in m.parameters())
    assert len(frozen_towers(start.model)) == 2


def test_openclip_start_embeds_like_the_open_clip_model(tmp_path):
    from pipeline.students import StudentEncoder
    from pipeline.teachers.openclip import OpenClipTeacher

    arch = "clipdistill-test-adapt-vit"
    cfg = {"embed_dim": 24,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    reference = OpenClipTeacher(arch, model_cfg=cfg)
    ckpt = tmp_path / "tiny-clip.pt"
    torch.save(reference.model.state_dict(), ckpt)
    start = load_start(f"openclip:{arch}/{ckpt}")
    assert start.model.embed_dim == 24 and all(p.requires_grad for p in start.model.parameters())
    exported = load_student_model(export_student(start.model, None, tmp_path / "oc-student.pt"))[0]
    for got, want in zip(_embed(StudentEncoder(exported)), _embed(reference)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
