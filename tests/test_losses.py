"""DSMD losses (method.md 1.1-1.4) against naive per-row Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.common.errors import PipelineError
from pipeline.distill.losses import (
    ContrastiveDistillLoss,
    FeatureDistillLoss,
    HardNegativeDistillLoss,
    LossConfig,
    MultiscaleDistillLoss,
    PairContrastiveLoss,
    SimilarityDistillLoss,
    caption_hashes,
    max_violation_triplet,
)
from pipeline.distill.queue import ActiveQueue

torch.set_num_threads(1)


def unit(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(dtype)


def batch(b=6, d=8, seed=0):
    return tuple(unit(b, d, seed=seed + k) for k in range(4))


def close(t, ref):
    """float32 loss vs float64 reference."""
    return t.item() == pytest.approx(ref, rel=1e-5, abs=1e-5)


def trained_batch(b=6, d=8, seed=0, noise=0.7):
    """Students that already resemble their teachers, so the positive logit dominates (mid-training)."""
    t_img, t_txt = unit(b, d, seed=seed), unit(b, d, seed=seed + 1)
    s_img = F.normalize(t_img + noise * unit(b, d, seed=seed + 2), dim=-1)
    s_txt = F.normalize(t_txt + noise * unit(b, d, seed=seed + 3), dim=-1)
    return s_img, s_txt, t_img, t_txt


# ---- naive references (float64, one row at a time) -------------------------------------------
def naive_cd(anchor, pos, queue, row_ids, q_ids, tau, row_hash=None, q_hash=None):
    a, p, q = anchor.double().tolist(), pos.double().tolist(), queue.double().tolist()
    dot = lambda x, y: sum(u * v for u, v in zip(x, y))  # noqa: E731
    total = 0.0
    for i in range(len(a)):
        logits = [dot(a[i], p[i]) / tau]
        for k in range(len(q)):
            same = int(row_ids[i]) == int(q_ids[k])
            if row_hash is not None and q_hash is not None:
                same = same or int(row_hash[i]) == int(q_hash[k])
            if not same:
                logits.append(dot(a[i], q[k]) / tau)
        mx = max(logits)
        total += -(logits[0] - mx - math.log(sum(math.exp(v - mx) for v in logits)))
    return total / len(a)


def naive_hnd_pair(anchor, target, ids, margin, hashes=None):
    a, p = anchor.double().tolist(), target.double().tolist()
    dot = lambda x, y: sum(u * v for u, v in zip(x, y))  # noqa: E731
    n = len(a)

    def neg(i, j):
        if int(ids[i]) == int(ids[j]):
            return False
        return not (hashes is not None and int(hashes[i]) == int(hashes[j]))

    total = 0.0
    for i in range(n):
        sii = dot(a[i], p[i])
        row = [dot(a[i], p[j]) for j in range(n) if neg(i, j)]  # hardest target for anchor i
        col = [dot(a[j], p[i]) for j in range(n) if neg(i, j)]  # hardest anchor for target i
        total += max(0.0, margin - sii + max(row)) if row else 0.0
        total += max(0.0, margin - sii + max(col)) if col else 0.0
    return total / n


# ---- contrastive distillation -----------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_cd_matches_naive_without_masking(tau):
    s_img, s_txt, t_img, t_txt = batch()
    q_img, q_txt = unit(11, 8, seed=10), unit(11, 8, seed=11)
    ids = torch.arange(6)
    q_ids = torch.arange(100, 111)  # disjoint: nothing masked
    out = ContrastiveDistillLoss(tau)(s_img, s_txt, t_img, t_txt, ids, q_img, q_txt, q_ids, q_ids)
    assert close(out["cd_img"], naive_cd(s_img, t_img, q_img, ids, q_ids, tau))
    assert close(out["cd_txt"], naive_cd(s_txt, t_txt, q_txt, ids, q_ids, tau))
    assert out["cd"].item() == pytest.approx(out["cd_img"].item() + out["cd_txt"].item(), rel=1e-6)
    assert set(out) == {"cd_img", "cd_txt", "cd"}


def test_cd_false_negative_mask_sibling_caption_in_queue():
    """A sibling caption of row 0 (same image_id) sits in the text queue: it must not be a negative."""
    s_img, s_txt, t_img, t_txt = trained_batch(b=4, seed=3)
    q_img, q_txt = unit(9, 8, seed=20), unit(9, 8, seed=21)
    # Queue slot 2 holds a caption of image 0 that is very close to row 0's own teacher caption.
    q_txt[2] = F.normalize(t_txt[0] + 0.05 * unit(8, seed=5), dim=0)
    q_img[4] = t_img[1]  # the image of row 1, from an earlier batch
    ids = torch.tensor([0, 1, 2, 3])
    q_img_ids = torch.tensor([50, 51, 52, 53, 1, 55, 56, 57, 58])
    q_txt_ids = torch.tensor([50, 51, 0, 53, 54, 55, 56, 57, 58])
    loss = ContrastiveDistillLoss(0.05)
    masked = loss(s_img, s_txt, t_img, t_txt, ids, q_img, q_txt, q_img_ids, q_txt_ids)
    unmasked = loss(s_img, s_txt, t_img, t_txt, ids, q_img, q_txt, q_img_ids * 0 - 1, q_txt_ids * 0 - 1)
    assert close(masked["cd_txt"], naive_cd(s_txt, t_txt, q_txt, ids, q_txt_ids, 0.05))
    assert close(masked["cd_img"], naive_cd(s_img, t_img, q_img, ids, q_img_ids, 0.05))
    assert masked["cd_txt"].item() < unmasked["cd_txt"].item() - 1e-3
    assert masked["cd_img"].item() < unmasked["cd_img"].item() - 1e-3


def test_cd_identical_caption_hash_masks_text_only():
    s_img, s_txt, t_img, t_txt = trained_batch(b=3, seed=4)
    q_img, q_txt = unit(5, 8, seed=30), unit(5, 8, seed=31)
    q_txt[3] = t_txt[1]  # the same caption string, written for another image
    ids = torch.tensor([0, 1, 2])
    q_ids = torch.tensor([10, 11, 12, 13, 14])
    h = torch.tensor([100, 101, 102])
    qh = torch.tensor([900, 901, 902, 101, 904])
    loss = ContrastiveDistillLoss(0.05)
    with_h = loss(s_img, s_txt, t_img, t_txt, ids, q_img, q_txt, q_ids, q_ids, h, qh)
    without = loss(s_img, s_txt, t_img, t_txt, ids, q_img, q_txt, q_ids, q_ids)
    assert close(with_h["cd_txt"], naive_cd(s_txt, t_txt, q_txt, ids, q_ids, 0.05, h, qh))
    assert with_h["cd_txt"].item() < without["cd_txt"].item() - 1e-2
    assert with_h["cd_img"].item() == pytest.approx(without["cd_img"].item(), rel=1e-6)


def test_cd_cross_modal_terms_match_naive():
    s_img, s_txt, t_img, t_txt = batch(b=5, seed=6)
    q_img, q_txt = unit(7, 8, seed=40), unit(7, 8, seed=41)
    ids = torch.tensor([0, 0, 1, 2, 2])
    q_ids = torch.tensor([0, 5, 6, 2, 8, 9, 1])
    h, qh = torch.arange(5), torch.tensor([70, 71, 3, 73, 74, 75, 76])
    out = ContrastiveDistillLoss(0.1, cross_modal=True)(s_img, s_txt, t_img, t_txt, ids, q_img, q_txt, q_ids,
                                                         q_ids, h, qh)
    assert close(out["cd_img2txt"], naive_cd(s_img, t_txt, q_txt, ids, q_ids, 0.1, h, qh))
    assert close(out["cd_txt2img"], naive_cd(s_txt, t_img, q_img, ids, q_ids, 0.1))
    parts = ["cd_img", "cd_txt", "cd_img2txt", "cd_txt2img"]
    assert out["cd"].item() == pytest.approx(sum(out[k].item() for k in parts), rel=1e-6)


def test_cd_empty_queue_and_all_masked_rows_are_zero_with_finite_grads():
    s_img, s_txt, t_img, t_txt = batch(b=3, seed=7)
    s_img.requires_grad_(True)
    loss = ContrastiveDistillLoss(0.05)
    empty = torch.empty(0, 8)
    eids = torch.empty(0, dtype=torch.int64)
    out = loss(s_img, s_txt, t_img, t_txt, torch.arange(3), empty, empty, eids, eids)
    assert out["cd"].item() == 0.0
    # Every queue entry belongs to the row's own image (one image in flight): only the positive is left.
    q = unit(4, 8, seed=8)
    same = torch.zeros(4, dtype=torch.int64)
    out = loss(s_img, s_txt, t_img, t_txt, torch.zeros(3, dtype=torch.int64), q, q, same, same)
    out["cd"].backward()
    assert out["cd"].item() == pytest.approx(0.0, abs=1e-7)
    assert torch.isfinite(s_img.grad).all()


def test_cd_low_precision_inputs_computed_in_float32():
    s_img, s_txt, t_img, t_txt = batch(seed=9)
    q = unit(10, 8, seed=12)
    ids, q_ids = torch.arange(6), torch.arange(20, 30)
    ref = ContrastiveDistillLoss(0.05)(s_img, s_txt, t_img, t_txt, ids, q, q, q_ids, q_ids)["cd"]
    for dt in (torch.float16, torch.bfloat16):
        args = [x.to(dt) for x in (s_img, s_txt, t_img, t_txt)]
        out = ContrastiveDistillLoss(0.05)(*args, ids, q.to(dt), q.to(dt), q_ids, q_ids)["cd"]
        assert out.dtype == torch.float32
        assert out.item() == pytest.approx(ref.item(), rel=5e-2)


# ---- feature / similarity distillation --------------------------------------------------------
def test_fd_and_sd_match_naive():
    s_img, s_txt, t_img, t_txt = batch(b=5, d=7, seed=13)
    s_img = s_img * 1.7  # SD is a true cosine; FD is raw L1
    fd = FeatureDistillLoss()(s_img, s_txt, t_img, t_txt)
    sd = SimilarityDistillLoss()(s_img, s_txt, t_img, t_txt)

    def l1(a, b):
        return sum(abs(x - y) for ra, rb in zip(a.tolist(), b.tolist()) for x, y in zip(ra, rb)) / a.numel()

    def one_minus_cos(a, b):
        tot = 0.0
        for ra, rb in zip(a.tolist(), b.tolist()):
            dot = sum(x * y for x, y in zip(ra, rb))
            tot += 1 - dot / (math.sqrt(sum(x * x for x in ra)) * math.sqrt(sum(y * y for y in rb)))
        return tot / len(a)

    assert close(fd["fd_img"], l1(s_img, t_img))
    assert close(fd["fd_txt"], l1(s_txt, t_txt))
    assert close(fd["fd"], l1(s_img, t_img) + l1(s_txt, t_txt))
    assert close(sd["sd_img"], one_minus_cos(s_img, t_img))
    assert close(sd["sd"], one_minus_cos(s_img, t_img) + one_minus_cos(s_txt, t_txt))
    same = SimilarityDistillLoss()(t_img, t_txt, t_img, t_txt)["sd"]
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_fd_mse_matches_naive_and_kind_is_checked():
    s_img, s_txt, t_img, t_txt = batch(b=4, d=6, seed=19)
    s_img = s_img * 1.3
    fd = FeatureDistillLoss("mse")(s_img, s_txt, t_img, t_txt)

    def mse(a, b):
        return sum((x - y) ** 2 for ra, rb in zip(a.tolist(), b.tolist()) for x, y in zip(ra, rb)) / a.numel()

    assert close(fd["fd_img"], mse(s_img, t_img))
    assert close(fd["fd"], mse(s_img, t_img) + mse(s_txt, t_txt))
    l1 = FeatureDistillLoss()(s_img, s_txt, t_img, t_txt)["fd"]
    assert abs(l1.item() - fd["fd"].item()) > 1e-3  # the two kinds really differ
    wrapped = MultiscaleDistillLoss(LossConfig(cd=False, sd=False, hnd=False, fd_kind="mse"))
    assert wrapped(s_img, s_txt, t_img, t_txt, torch.arange(4))["fd"].item() == pytest.approx(fd["fd"].item())
    with pytest.raises(PipelineError, match="fd_kind"):
        LossConfig(fd_kind="l2")
    with pytest.raises(PipelineError):
        FeatureDistillLoss("huber")


def test_shape_mismatch_is_pipeline_error():
    s_img, s_txt, t_img, t_txt = batch()
    with pytest.raises(PipelineError):
        FeatureDistillLoss()(s_img, s_txt, t_img[:3], t_txt)


# ---- hard-negative distillation --------------------------------------------------------------
@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_hnd_matches_naive_distinct_images(margin):
    s_img, s_txt, t_img, t_txt = batch(b=6, seed=14)
    ids = torch.arange(6)
    out = HardNegativeDistillLoss(margin)(s_img, s_txt, t_img, t_txt, ids)
    pairs = {"hnd_img_img": (s_img, t_img), "hnd_txt_txt": (s_txt, t_txt),
             "hnd_img_txt": (s_img, t_txt), "hnd_txt_img": (s_txt, t_img)}
    for k, (a, p) in pairs.items():
        assert close(out[k], naive_hnd_pair(a, p, ids, margin)), k
    assert out["hnd"].item() == pytest.approx(sum(out[k].item() for k in pairs), rel=1e-6)
    assert out["hnd"].item() > 0  # random vectors: some violations exist


def test_hnd_sibling_captions_in_batch_are_masked():
    """Unshuffled batch: rows 0-2 are captions of image 7. Siblings are not negatives."""
    s_img, s_txt, t_img, t_txt = batch(b=6, seed=15)
    t_img[1], t_img[2] = t_img[0], t_img[0]  # one teacher image embedding per image
    ids = torch.tensor([7, 7, 7, 8, 9, 9])
    h = torch.tensor([1, 2, 3, 4, 5, 2])  # row 5's caption is the same string as row 1's
    margin = 0.1
    out = HardNegativeDistillLoss(margin)(s_img, s_txt, t_img, t_txt, ids, h)
    no_mask = HardNegativeDistillLoss(margin)(s_img, s_txt, t_img, t_txt, torch.arange(6))
    assert close(out["hnd_img_img"], naive_hnd_pair(s_img, t_img, ids, margin))
    for k, (a, p) in {"hnd_txt_txt": (s_txt, t_txt), "hnd_img_txt": (s_img, t_txt),
                      "hnd_txt_img": (s_txt, t_img)}.items():
        assert close(out[k], naive_hnd_pair(a, p, ids, margin, h)), k
    # Identical teacher images of siblings give S_ij == S_ii, so unmasked they always violate the margin.
    assert out["hnd_img_img"].item() < no_mask["hnd_img_img"].item() - 1e-3


def test_hnd_single_image_batch_contributes_zero_and_finite_grad():
    s_img, s_txt, t_img, t_txt = batch(b=4, seed=16)
    s_img.requires_grad_(True)
    s_txt.requires_grad_(True)
    out = HardNegativeDistillLoss(0.2)(s_img, s_txt, t_img, t_txt, torch.full((4,), 3))
    out["hnd"].backward()
    assert out["hnd"].item() == 0.0
    assert torch.isfinite(s_img.grad).all() and torch.isfinite(s_txt.grad).all()
    # Partially masked: row 0 alone has negatives, the rest share an image -> equals the naive rule.
    ids = torch.tensor([0, 1, 1, 1])
    out = HardNegativeDistillLoss(0.2)(s_img, s_txt, t_img, t_txt, ids)
    assert close(out["hnd_img_img"], naive_hnd_pair(s_img, t_img, ids, 0.2))


def test_hnd_gradient_matches_autograd_of_naive_formula():
    """Gradient check: torch loss vs a direct autograd of the loop formula."""
    s_img, _, t_img, _ = batch(b=5, seed=17)
    ids = torch.tensor([0, 1, 1, 2, 3])
    a = s_img.clone().double().requires_grad_(True)
    ref = 0.0
    t = t_img.double()
    for i in range(5):
        negs = [j for j in range(5) if ids[j] != ids[i]]
        sii = a[i] @ t[i]
        ref = ref + torch.clamp(0.1 - sii + torch.stack([a[i] @ t[j] for j in negs]).max(), min=0)
        ref = ref + torch.clamp(0.1 - sii + torch.stack([a[j] @ t[i] for j in negs]).max(), min=0)
    (ref / 5).backward()
    b = s_img.clone().requires_grad_(True)
    max_violation_triplet(b, t_img, 0.1, ids[:, None] == ids[None, :]).backward()
    assert torch.allclose(b.grad.double(), a.grad, atol=1e-5)


# ---- no-distillation pair loss -------------------------------------------------------------------
def naive_pair(s_img, s_txt, ids, tau, hashes=None):
    """(i2t, t2i) CLIP losses from per-row loops; a negative is another row's caption/image that has
    neither the row's image_id nor (when hashes are given) its caption."""
    a, b = s_img.double().tolist(), s_txt.double().tolist()
    dot = lambda x, y: sum(u * v for u, v in zip(x, y))  # noqa: E731
    n = len(a)

    def neg(i, j):
        if i == j or int(ids[i]) == int(ids[j]):
            return False
        return not (hashes is not None and int(hashes[i]) == int(hashes[j]))

    def ce(pos, negs):
        logits = [pos] + negs
        mx = max(logits)
        return -(pos - mx - math.log(sum(math.exp(v - mx) for v in logits)))

    i2t = sum(ce(dot(a[i], b[i]) / tau, [dot(a[i], b[j]) / tau for j in range(n) if neg(i, j)])
              for i in range(n))
    t2i = sum(ce(dot(a[i], b[i]) / tau, [dot(a[j], b[i]) / tau for j in range(n) if neg(i, j)])
              for i in range(n))
    return i2t / n, t2i / n


@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_pair_loss_matches_naive_distinct_images(tau):
    s_img, s_txt, _, _ = batch(b=6, seed=21)
    ids = torch.arange(6)
    out = PairContrastiveLoss(tau)(s_img, s_txt, ids)
    i2t, t2i = naive_pair(s_img, s_txt, ids, tau)
    assert close(out["pair_i2t"], i2t) and close(out["pair_t2i"], t2i)
    assert close(out["pair"], i2t + t2i)
    # Unmasked, it is exactly CLIP's cross-entropy over the similarity matrix in both directions.
    logits = s_img @ s_txt.t() / tau
    ref = F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))
    assert out["pair"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_pair_loss_masks_same_image_and_identical_captions():
    s_img, s_txt, _, _ = batch(b=6, seed=22)
    s_img[1] = s_img[0]  # rows 0 and 1: two captions of image 4 (same pixels)
    ids = torch.tensor([4, 4, 5, 6, 7, 8])
    h = torch.tensor([10, 11, 12, 13, 14, 12])  # row 5 repeats row 2's caption for another image
    loss = PairContrastiveLoss(0.05)
    masked = loss(s_img, s_txt, ids, h)
    i2t, t2i = naive_pair(s_img, s_txt, ids, 0.05, h)
    assert close(masked["pair_i2t"], i2t) and close(masked["pair_t2i"], t2i)
    only_ids = loss(s_img, s_txt, ids)
    i2t_ids, t2i_ids = naive_pair(s_img, s_txt, ids, 0.05)
    assert close(only_ids["pair_i2t"], i2t_ids) and close(only_ids["pair_t2i"], t2i_ids)
    unmasked = loss(s_img, s_txt, torch.arange(6))
    # Masking only removes negatives, so every row's CE can only fall; the caption mask adds to the id mask.
    assert masked["pair"].item() < only_ids["pair"].item() < unmasked["pair"].item()


def test_pair_loss_single_image_batch_is_zero_with_finite_grads():
    s_img, s_txt, _, _ = batch(b=3, seed=23)
    s_img.requires_grad_(True)
    out = PairContrastiveLoss(0.05)(s_img, s_txt, torch.zeros(3, dtype=torch.int64))
    out["pair"].backward()
    assert out["pair"].item() == pytest.approx(0.0, abs=1e-7)
    assert torch.isfinite(s_img.grad).all()


def test_pair_loss_ignores_teacher_and_trains_without_distillation():
    """Only `pair` on: the wrapper needs no queue and the teacher targets do not change the loss."""
    s_img, s_txt, t_img, t_txt = batch(b=5, seed=24)
    ids = torch.tensor([0, 1, 1, 2, 3])
    cfg = LossConfig(cd=False, fd=False, sd=False, hnd=False, pair=True, pair_tau=0.1)
    crit = MultiscaleDistillLoss(cfg)
    assert crit.names == ("pair",)
    a = crit(s_img, s_txt, t_img, t_txt, ids)
    b = crit(s_img, s_txt, -t_img, t_txt.flip(0), ids)
    assert list(a) == ["pair"] and a["pair"].item() == b["pair"].item()
    assert a["pair"].item() == pytest.approx(sum(naive_pair(s_img, s_txt, ids, 0.1)), rel=1e-5)
    assert "pair" not in LossConfig().enabled  # off by default: the default stays the paper's four losses
    with pytest.raises(PipelineError, match="pair_tau"):
        LossConfig(pair_tau=0.0)


def test_pair_only_config_from_overrides():
    from pipeline.common import config as cfgio
    from pipeline.distill.trainer import DistillConfig

    cfg = cfgio.load(DistillConfig, None, ["losses.cd=false", "losses.fd=false", "losses.sd=false",
                                           "losses.hnd=false", "losses.pair=true"])
    assert cfg.losses.enabled == ("pair",)
    with pytest.raises(PipelineError, match="fd_kind"):
        cfgio.load(DistillConfig, None, ["losses.fd_kind=cosine"])


# ---- wrapper ------------------------------------------------------------------------------------
def test_multiscale_wrapper_switches_and_sums():
    s_img, s_txt, t_img, t_txt = batch(b=4, seed=18)
    qids = torch.arange(10, 16)
    q = ActiveQueue(unit(6, 8, seed=50), qids, unit(6, 8, seed=51), qids, None)
    ids = torch.tensor([0, 0, 1, 2])
    full = MultiscaleDistillLoss(LossConfig(tau=0.07, margin=0.1))
    losses = full(s_img, s_txt, t_img, t_txt, ids, queue=q)
    assert list(losses) == ["cd", "fd", "sd", "hnd"]
    cd = ContrastiveDistillLoss(0.07)(s_img, s_txt, t_img, t_txt, ids, q.img, q.txt, q.img_ids, q.txt_ids)
    hnd = HardNegativeDistillLoss(0.1)(s_img, s_txt, t_img, t_txt, ids)
    assert losses["cd"].item() == pytest.approx(cd["cd"].item())
    assert losses["hnd"].item() == pytest.approx(hnd["hnd"].item())
    only = MultiscaleDistillLoss(LossConfig(cd=False, hnd=False))
    out = only(s_img, s_txt, t_img, t_txt, ids)  # no queue needed without CD
    assert list(out) == ["fd", "sd"]
    with pytest.raises(PipelineError):
        full(s_img, s_txt, t_img, t_txt, ids, queue=None)
    with pytest.raises(PipelineError):
        MultiscaleDistillLoss(LossConfig(cd=False, fd=False, sd=False, hnd=False))


def test_caption_hashes():
    h = caption_hashes(["A dog runs.", "a  dog runs. ", "A cat.", "A dog runs."])
    assert h.dtype == np.int64
    assert h[0] == h[1] == h[3] and h[0] != h[2]
    assert (caption_hashes(["A cat."]) == h[2]).all()  # stable across calls (no Python hash salt)


# ---- registry: a new loss is one module plus one registration line --------------------------------------
def test_a_registered_extra_loss_is_enabled_by_config_and_reaches_the_balancer():
    from torch import nn

    from pipeline.common import config as cfgio
    from pipeline.distill.balancer import make_balancer
    from pipeline.distill.losses import REGISTRY, LossInputs, register
    from pipeline.distill.trainer import DistillConfig

    class CosineGap(nn.Module):  # what "one new module" would hold
        def __init__(self, scale: float):
            super().__init__()
            self.scale = scale

        def of(self, x: LossInputs) -> dict:
            gap = self.scale * (1 - (x.s_img * x.t_img).sum(-1)).mean()
            return {"cosgap": gap}

    register("cosgap", lambda c: CosineGap(**c.extra["cosgap"]))  # the one registration line
    try:
        s_img, s_txt, t_img, t_txt = batch(b=4, seed=30)
        ids = torch.arange(4)
        cfg = cfgio.load(DistillConfig, None, ["losses.cd=false", "losses.extra={cosgap: {scale: 2.0}}"])
        assert cfg.losses.enabled == ("fd", "sd", "hnd", "cosgap")
        out = MultiscaleDistillLoss(cfg.losses)(s_img, s_txt, t_img, t_txt, ids)
        expected = 2.0 * (1 - (s_img * t_img).sum(-1)).mean()
        assert list(out) == ["fd", "sd", "hnd", "cosgap"] and torch.allclose(out["cosgap"], expected)
        total, _ = make_balancer("dynamic", cfg.losses.enabled)(out)
        assert torch.isfinite(total)
        with pytest.raises(PipelineError, match="not registered"):
            LossConfig(extra={"nosuch": {}})
    finally:
        REGISTRY.pop("cosgap")
    assert "cosgap" not in LossConfig().enabled


def naive_affinity(s_img, s_txt, t_img, t_txt, tau):
    """Both directions' mean over rows of sum_j p_t log(p_t / p_s) of the cross-modal softmaxes, written out."""
    import math

    def kl_rows(s, t):
        total = 0.0
        for i in range(len(s)):
            zs = [math.exp(v) for v in (s[i] / tau).tolist()]
            zt = [math.exp(v) for v in (t[i] / tau).tolist()]
            ps, pt = [z / sum(zs) for z in zs], [z / sum(zt) for z in zt]
            total += sum(q * math.log(q / p) for q, p in zip(pt, ps))
        return total / len(s)

    s, t = s_img @ s_txt.t(), t_img @ t_txt.t()
    return kl_rows(s, t) + kl_rows(s.t(), t.t())


def affinity_config(params: str):
    from pipeline.common import config as cfgio
    from pipeline.distill.trainer import DistillConfig

    return cfgio.load(DistillConfig, None, ["losses.cd=false", "losses.fd=false", "losses.sd=false",
                                            "losses.hnd=false", f"losses.extra={{affinity: {params}}}"]).losses


def test_affinity_loss_matches_a_naive_kl_of_the_cross_modal_softmaxes():
    import math

    from pipeline.common import config as cfgio
    from pipeline.distill.trainer import DistillConfig

    s_img, s_txt, t_img, t_txt = batch(b=5, seed=41)
    cfg = affinity_config("{tau: 0.1}")
    out = MultiscaleDistillLoss(cfg)(s_img, s_txt, t_img, t_txt, torch.arange(5))
    assert list(out) == ["affinity"]
    expected = naive_affinity(s_img, s_txt, t_img, t_txt, 0.1)
    assert math.isclose(float(out["affinity"]), expected, rel_tol=1e-4)
    same = MultiscaleDistillLoss(cfg)(t_img, t_txt, t_img, t_txt, torch.arange(5))
    assert float(same["affinity"]) < 1e-6  # a student that agrees with the teacher pays nothing
    with pytest.raises(PipelineError, match="tau must be > 0"):
        MultiscaleDistillLoss(cfgio.load(DistillConfig, None, ["losses.extra={affinity: {tau: 0}}"]).losses)
    with pytest.raises(PipelineError, match="rows must be one of pairs, all"):
        MultiscaleDistillLoss(affinity_config("{rows: every}"))


def test_affinity_over_all_rows_takes_transfer_images_and_captions_into_the_cross_modal_matrix():
    import math

    s_img, s_txt, t_img, t_txt = batch(b=4, seed=43)
    m_img, _, mt_img, _ = batch(b=3, seed=44)  # 3 caption-less images
    _, m_txt, _, mt_txt = batch(b=2, seed=45)  # 2 image-less captions
    transfer = (m_img, mt_img, torch.arange(100, 103))
    transfer_text = (m_txt, mt_txt, torch.full((2,), -1), torch.arange(2))
    pairs_only = MultiscaleDistillLoss(affinity_config("{tau: 0.1}"))
    every_row = MultiscaleDistillLoss(affinity_config("{tau: 0.1, rows: all}"))
    args = (s_img, s_txt, t_img, t_txt, torch.arange(4))
    got_pairs = float(pairs_only(*args, transfer=transfer, transfer_text=transfer_text)["affinity"])
    assert math.isclose(got_pairs, naive_affinity(s_img, s_txt, t_img, t_txt, 0.1), rel_tol=1e-4)
    got_all = float(every_row(*args, transfer=transfer, transfer_text=transfer_text)["affinity"])
    expected = naive_affinity(torch.cat([s_img, m_img]), torch.cat([s_txt, m_txt]), torch.cat([t_img, mt_img]),
                              torch.cat([t_txt, mt_txt]), 0.1)  # a (7 x 6) image-caption matrix
    assert math.isclose(got_all, expected, rel_tol=1e-4)
    # the transfer rows are trained by it: their student embeddings receive gradient
    m_img = m_img.clone().requires_grad_(True)
    every_row(*args, transfer=(m_img, mt_img, torch.arange(100, 103)), transfer_text=transfer_text)["affinity"].backward()
    assert float(m_img.grad.abs().sum()) > 0
