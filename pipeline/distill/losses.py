"""Stage-2 distillation losses of DSMD (docs/method.md section 1.1-1.4), and a no-distillation baseline.

Every loss is a small ``nn.Module`` whose ``forward`` returns a dict of scalar tensors: the per-modality
(or per-pair) parts plus their sum under the loss's own name, so each part can be logged on its own.
All maths runs in float32 whatever the input dtype (fp16/bf16 logits at tau=0.05 overflow).

Inputs (B = batch rows, D = teacher width, K = filled queue entries)::

    s_img, s_txt   (B, D)  student embeddings, already L2-normalised (method.md notation)
    t_img, t_txt   (B, D)  cached teacher embeddings of the same rows, L2-normalised
    img_ids        (B,)    int64 image_id of each row (rows of one image share it)
    captions_hash  (B,)    optional int64 hash of each row's caption (see ``caption_hashes``)

Typical use by a trainer::

    crit = MultiscaleDistillLoss(LossConfig(tau=0.05, margin=0.0))
    q = queue.active(device)                          # pipeline.distill.queue.ActiveQueue (or None)
    losses = crit(s_img, s_txt, t_img, t_txt, img_ids, queue=q, captions_hash=h)
    total, info = balancer(losses)                    # pipeline.distill.balancer
    total.backward()
    queue.enqueue(...)                                # only after backward: see pipeline.distill.queue

False negatives (method.md 1.1, 1.4): a negative that shares the row's ``image_id`` is masked (logit set
to -inf, or excluded from the max); for text, an identical caption (equal hash) is masked too. The
positive is never masked.

``pair`` is not a distillation loss: it is the plain CLIP objective on the ground-truth pairs (the student's
own image and text embeddings, teacher targets unused), the "no distillation" row of the ablations.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.common.errors import PipelineError
from pipeline.train.contrastive import false_negative_mask, symmetric_infonce

if TYPE_CHECKING:  # typing only: the queue module does not depend on the losses
    from pipeline.distill.queue import ActiveQueue

LOSS_NAMES = ("cd", "fd", "sd", "hnd", "pair")
FD_KINDS = ("l1", "mse")


def caption_hashes(captions: Sequence[str]) -> np.ndarray:
    """Stable int64 hash per caption, for false-negative masking of identical captions.

    Case and runs of whitespace are ignored: the usual text towers (CLIP BPE, uncased BERT) map such
    variants to (nearly) the same embedding, so treating them as negatives is the same mistake.
    """
    out = np.empty(len(captions), dtype=np.int64)
    for i, c in enumerate(captions):
        key = " ".join(str(c).split()).casefold().encode("utf-8")
        out[i] = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True)
    return out


def _f32(x: Tensor) -> Tensor:
    return x.float()


def _ids(x: Tensor | np.ndarray | Sequence[int] | None, device: torch.device) -> Tensor | None:
    if x is None:
        return None
    return torch.as_tensor(x, dtype=torch.int64, device=device)


def _check_pair(a: Tensor, b: Tensor, what: str) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise PipelineError(f"{what}: expected two (B, D) tensors of equal shape, got {tuple(a.shape)} "
                            f"and {tuple(b.shape)}")


def queue_contrastive(
    anchor: Tensor,
    positive: Tensor,
    queue: Tensor,
    tau: float,
    neg_mask: Tensor | None = None,
) -> Tensor:
    """Mean over rows of CE([a.p, a.q_1..a.q_K] / tau, target 0), masked negatives excluded (method.md 1.1).

    Args:
        anchor: (B, D) student embeddings.
        positive: (B, D) matching teacher embeddings.
        queue: (K, D) teacher negatives; K may be 0 (the loss is then exactly 0).
        tau: temperature.
        neg_mask: optional (B, K) bool, True = drop that negative for that row.
    """
    a, p, q = _f32(anchor), _f32(positive), _f32(queue)
    pos = (a * p).sum(dim=1, keepdim=True)
    neg = a @ q.t()
    if neg_mask is not None:
        # -inf keeps the softmax exact; the positive column is finite, so no row is all -inf.
        neg = neg.masked_fill(neg_mask, float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / tau
    # CE with target 0 == logsumexp(logits) - logits[:, 0]
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


class ContrastiveDistillLoss(nn.Module):
    """Contrastive distillation against a queue of teacher negatives (method.md 1.1).

    Returns ``{"cd_img", "cd_txt", "cd"}``; with ``cross_modal=True`` also ``"cd_img2txt"`` (student image
    vs own teacher caption + teacher text queue) and ``"cd_txt2img"`` (student text vs own teacher image +
    teacher image queue), all summed into ``"cd"``.

    Masking: image-queue entries with the row's image_id; text-queue entries with the row's image_id or,
    when both hash arrays are given, the row's caption hash. Only queue entries are negatives (the
    current batch enters the queue after the step, as in MoCo), so there is no in-batch mask here.
    """

    def __init__(self, tau: float = 0.05, cross_modal: bool = False) -> None:
        super().__init__()
        if tau <= 0:
            raise PipelineError(f"contrastive temperature tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.cross_modal = bool(cross_modal)

    def forward(
        self,
        s_img: Tensor,
        s_txt: Tensor,
        t_img: Tensor,
        t_txt: Tensor,
        img_ids: Tensor,
        queue_img: Tensor,
        queue_txt: Tensor,
        queue_img_ids: Tensor,
        queue_txt_ids: Tensor,
        captions_hash: Tensor | None = None,
        queue_txt_hash: Tensor | None = None,
    ) -> dict[str, Tensor]:
        _check_pair(s_img, t_img, "contrastive distillation (image)")
        _check_pair(s_txt, t_txt, "contrastive distillation (text)")
        dev = s_img.device
        ids = _ids(img_ids, dev)
        qi_ids, qt_ids = _ids(queue_img_ids, dev), _ids(queue_txt_ids, dev)
        h, qh = _ids(captions_hash, dev), _ids(queue_txt_hash, dev)
        for q, q_ids in ((queue_img, qi_ids), (queue_txt, qt_ids)):
            if q.ndim != 2 or q.shape[1] != s_img.shape[1] or q.shape[0] != q_ids.shape[0]:
                raise PipelineError(f"contrastive distillation: queue of shape {tuple(q.shape)} with "
                                    f"{q_ids.shape[0]} ids does not fit embeddings of width {s_img.shape[1]}")

        img_mask = false_negative_mask(ids, qi_ids)
        txt_mask = false_negative_mask(ids, qt_ids, h, qh)
        out = {
            "cd_img": queue_contrastive(s_img, t_img, queue_img, self.tau, img_mask),
            "cd_txt": queue_contrastive(s_txt, t_txt, queue_txt, self.tau, txt_mask),
        }
        if self.cross_modal:
            # An image's false negatives among captions are the same as its caption's (same image or
            # identical caption); a caption's among images are those of its own image.
            out["cd_img2txt"] = queue_contrastive(s_img, t_txt, queue_txt, self.tau, txt_mask)
            out["cd_txt2img"] = queue_contrastive(s_txt, t_img, queue_img, self.tau, img_mask)
        out["cd"] = torch.stack(list(out.values())).sum()
        return out


class FeatureDistillLoss(nn.Module):
    """Element-wise distance between student and teacher embeddings, mean over B x D, per modality.

    ``kind="l1"`` is method.md 1.2 (the default); ``kind="mse"`` is the squared error of CLIP-KD's feature
    distillation, for the ablation. Returns ``{"fd_img", "fd_txt", "fd"}``.
    """

    def __init__(self, kind: str = "l1") -> None:
        super().__init__()
        if kind not in FD_KINDS:
            raise PipelineError(f"feature distillation kind must be one of {', '.join(FD_KINDS)}, "
                                f"not {kind!r}")
        self.kind = kind

    def _distance(self, s: Tensor, t: Tensor) -> Tensor:
        diff = _f32(s) - _f32(t)
        return diff.abs().mean() if self.kind == "l1" else diff.square().mean()

    def forward(self, s_img: Tensor, s_txt: Tensor, t_img: Tensor, t_txt: Tensor) -> dict[str, Tensor]:
        _check_pair(s_img, t_img, "feature distillation (image)")
        _check_pair(s_txt, t_txt, "feature distillation (text)")
        fi, ft = self._distance(s_img, t_img), self._distance(s_txt, t_txt)
        return {"fd_img": fi, "fd_txt": ft, "fd": fi + ft}


class SimilarityDistillLoss(nn.Module):
    """Mean over rows of 1 - cos(student, teacher), per modality (method.md 1.3).

    Returns ``{"sd_img", "sd_txt", "sd"}``. Uses the true cosine, so it does not rely on the inputs being
    normalised.
    """

    def forward(self, s_img: Tensor, s_txt: Tensor, t_img: Tensor, t_txt: Tensor) -> dict[str, Tensor]:
        _check_pair(s_img, t_img, "similarity distillation (image)")
        _check_pair(s_txt, t_txt, "similarity distillation (text)")
        si = (1.0 - F.cosine_similarity(_f32(s_img), _f32(t_img), dim=1)).mean()
        st = (1.0 - F.cosine_similarity(_f32(s_txt), _f32(t_txt), dim=1)).mean()
        return {"sd_img": si, "sd_txt": st, "sd": si + st}


def max_violation_triplet(anchor: Tensor, target: Tensor, margin: float, neg_mask: Tensor) -> Tensor:
    """Bidirectional VSE++ max-violation hinge, mean over the batch (method.md 1.4).

    Args:
        anchor: (B, D) anchors A.
        target: (B, D) targets P; S = A P^T, positives on the diagonal.
        margin: hinge margin m.
        neg_mask: (B, B) bool, True where j is not a valid negative of i (must include the diagonal).
            It must be symmetric, as both directions use it.

    A row whose negatives are all masked (e.g. a batch holding one image only) contributes 0 for that
    direction but still counts in the batch mean, so the loss scale stays independent of how many
    siblings a batch happens to hold.
    """
    s = _f32(anchor) @ _f32(target).t()
    diag = s.diagonal()
    masked = s.masked_fill(neg_mask, float("-inf"))
    total = s.new_zeros(())
    for dim in (1, 0):  # dim=1: hardest target per anchor; dim=0: hardest anchor per target
        hardest = masked.max(dim=dim).values
        valid = torch.isfinite(hardest)
        # where() rather than relying on clamp(-inf): keeps forward and backward free of inf arithmetic.
        hinge = torch.where(valid, (margin - diag + torch.where(valid, hardest, diag)).clamp_min(0), 0.0)
        total = total + hinge.mean()
    return total


class HardNegativeDistillLoss(nn.Module):
    """Hard-negative (max-violation) distillation over four student->teacher pairs (method.md 1.4).

    Returns ``{"hnd_img_img", "hnd_txt_txt", "hnd_img_txt", "hnd_txt_img", "hnd"}`` where ``hnd_a_b`` is
    L(s_a, t_b). In-batch negatives with the anchor's image_id are masked; in the three pairs that
    involve text, rows with an identical caption (equal ``captions_hash``) are masked too, since then
    the teacher caption embeddings coincide. Images that merely share a caption stay negatives in the
    image-image pair.
    """

    def __init__(self, margin: float = 0.0) -> None:
        super().__init__()
        self.margin = float(margin)

    def forward(
        self,
        s_img: Tensor,
        s_txt: Tensor,
        t_img: Tensor,
        t_txt: Tensor,
        img_ids: Tensor,
        captions_hash: Tensor | None = None,
    ) -> dict[str, Tensor]:
        _check_pair(s_img, t_img, "hard-negative distillation (image)")
        _check_pair(s_txt, t_txt, "hard-negative distillation (text)")
        dev = s_img.device
        ids = _ids(img_ids, dev)
        h = _ids(captions_hash, dev)
        img_mask = false_negative_mask(ids, ids)  # includes the diagonal, as every row shares its own id
        txt_mask = false_negative_mask(ids, ids, h, h)
        m = self.margin
        out = {
            "hnd_img_img": max_violation_triplet(s_img, t_img, m, img_mask),
            "hnd_txt_txt": max_violation_triplet(s_txt, t_txt, m, txt_mask),
            "hnd_img_txt": max_violation_triplet(s_img, t_txt, m, txt_mask),
            "hnd_txt_img": max_violation_triplet(s_txt, t_img, m, txt_mask),
        }
        out["hnd"] = torch.stack(list(out.values())).sum()
        return out


class PairContrastiveLoss(nn.Module):
    """No distillation: symmetric in-batch InfoNCE between the student's own image and text embeddings.

    The CLIP objective on the ground-truth pairs with a fixed temperature; the teacher targets are never
    used. With S = s_img s_txt^T / tau, ``pair_i2t`` is the mean CE of each row of S against its own
    caption and ``pair_t2i`` the same for each column; ``pair`` is their sum (like the other losses, the
    sum of its two directions). False negatives as in method.md 1.1: a column (row) whose image_id equals
    the row's, or whose caption is identical (equal ``captions_hash``), is masked; the diagonal never is.
    Returns ``{"pair_i2t", "pair_t2i", "pair"}``.
    """

    def __init__(self, tau: float = 0.05) -> None:
        super().__init__()
        if tau <= 0:
            raise PipelineError(f"pair-loss temperature pair_tau must be > 0, got {tau}")
        self.tau = float(tau)

    def forward(self, s_img: Tensor, s_txt: Tensor, img_ids: Tensor,
                captions_hash: Tensor | None = None) -> dict[str, Tensor]:
        _check_pair(s_img, s_txt, "pair contrastive loss")
        dev = s_img.device
        ids, h = _ids(img_ids, dev), _ids(captions_hash, dev)
        logits = (_f32(s_img) @ _f32(s_txt).t()) / self.tau
        # Symmetric (same image or same caption), so one mask serves both directions.
        i2t, t2i = symmetric_infonce(logits, false_negative_mask(ids, ids, h, h))
        return {"pair_i2t": i2t, "pair_t2i": t2i, "pair": i2t + t2i}


@dataclass(frozen=True)
class LossConfig:
    """Which losses are on, and their hyper-parameters (defaults: the paper's DSMD, method.md 1.6).

    ``pair`` (off by default) trains on the ground-truth pairs without the teacher (PairContrastiveLoss).
    """

    cd: bool = True
    fd: bool = True
    sd: bool = True
    hnd: bool = True
    pair: bool = False
    tau: float = 0.05
    margin: float = 0.0
    cross_modal: bool = False
    fd_kind: str = "l1"  # l1 (method.md 1.2) | mse (CLIP-KD's feature distillation)
    pair_tau: float = 0.05

    def __post_init__(self) -> None:
        # Checked here, not only when the loss is built, so a typo fails even while that loss is off.
        if self.fd_kind not in FD_KINDS:
            raise PipelineError(f"losses.fd_kind must be one of {', '.join(FD_KINDS)}, not {self.fd_kind!r}")
        if self.pair_tau <= 0:
            raise PipelineError(f"losses.pair_tau must be > 0, got {self.pair_tau}")

    @property
    def enabled(self) -> tuple[str, ...]:
        """Names of the enabled losses, in a fixed order (the keys ``MultiscaleDistillLoss`` returns)."""
        return tuple(n for n in LOSS_NAMES if getattr(self, n))


class MultiscaleDistillLoss(nn.Module):
    """All enabled losses in one call; feed the result to a balancer (pipeline.distill.balancer).

    ``forward`` returns ``{name: scalar}`` for the enabled raw losses (subset of ``cd, fd, sd, hnd, pair``);
    with ``with_parts=True`` it returns ``(losses, parts)`` where ``parts`` holds every per-modality /
    per-pair component (detached) for logging.
    """

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config or LossConfig()
        if not self.config.enabled:
            raise PipelineError("loss config enables no loss: turn on at least one of "
                                + ", ".join(LOSS_NAMES))
        self.cd = ContrastiveDistillLoss(self.config.tau, self.config.cross_modal) if self.config.cd else None
        self.fd = FeatureDistillLoss(self.config.fd_kind) if self.config.fd else None
        self.sd = SimilarityDistillLoss() if self.config.sd else None
        self.hnd = HardNegativeDistillLoss(self.config.margin) if self.config.hnd else None
        self.pair = PairContrastiveLoss(self.config.pair_tau) if self.config.pair else None

    @property
    def names(self) -> tuple[str, ...]:
        return self.config.enabled

    def forward(
        self,
        s_img: Tensor,
        s_txt: Tensor,
        t_img: Tensor,
        t_txt: Tensor,
        img_ids: Tensor,
        queue: ActiveQueue | None = None,
        captions_hash: Tensor | None = None,
        with_parts: bool = False,
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Compute the enabled losses.

        Args:
            queue: the negatives for CD (``NegativeQueue.active(device)``). Required when CD is on; an
                empty queue is allowed and gives CD = 0 (no negatives yet).
            captions_hash: optional (B,) int64 caption hashes; masks identical captions in CD, HND and pair.
        """
        parts: dict[str, Tensor] = {}
        if self.cd is not None:
            if queue is None:
                raise PipelineError("contrastive distillation is enabled but no negative queue was given")
            parts.update(self.cd(s_img, s_txt, t_img, t_txt, img_ids, queue.img, queue.txt, queue.img_ids,
                                 queue.txt_ids, captions_hash, queue.txt_hash))
        if self.fd is not None:
            parts.update(self.fd(s_img, s_txt, t_img, t_txt))
        if self.sd is not None:
            parts.update(self.sd(s_img, s_txt, t_img, t_txt))
        if self.hnd is not None:
            parts.update(self.hnd(s_img, s_txt, t_img, t_txt, img_ids, captions_hash))
        if self.pair is not None:
            parts.update(self.pair(s_img, s_txt, img_ids, captions_hash))
        losses = {n: parts[n] for n in self.names}
        if with_parts:
            return losses, {k: v.detach() for k, v in parts.items()}
        return losses
