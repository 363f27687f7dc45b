"""Mean-teacher building blocks (method.md section 3): EMA teacher and its momentum schedule, the labelled
contrastive loss, the consistency loss against an embedding bank, the bank, and the labelled split.

Inputs are L2-normalised embeddings (method.md notation); all loss maths runs in float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.common.errors import PipelineError
from pipeline.train.contrastive import false_negative_mask, symmetric_infonce


# ---- EMA teacher --------------------------------------------------------------------------------------


def momentum_at(step: int, total_steps: int, m0: float = 0.99, m1: float = 1.0) -> float:
    """Cosine schedule from ``m0`` at step 0 to ``m1`` at ``total_steps`` (DINO's teacher momentum)."""
    if not 0.0 <= m0 <= m1 <= 1.0:
        raise PipelineError(f"EMA momentum needs 0 <= m0 <= m1 <= 1, got m0={m0}, m1={m1}")
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    return m1 - (m1 - m0) * (math.cos(math.pi * t) + 1.0) / 2.0


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t <- m theta_t + (1 - m) theta_s`` for every floating parameter and buffer (batch-norm
    statistics included); integer buffers (batch counters) are copied."""
    t_state, s_state = teacher.state_dict(keep_vars=True), student.state_dict(keep_vars=True)
    if t_state.keys() != s_state.keys():
        raise PipelineError("EMA teacher and student have different parameters")
    floats_t, floats_s = [], []
    for key, t in t_state.items():
        s = s_state[key]
        if t.dtype.is_floating_point:
            floats_t.append(t.data)
            floats_s.append(s.data)
        else:
            t.data.copy_(s.data)
    if floats_t:
        torch._foreach_lerp_(floats_t, floats_s, 1.0 - momentum)  # t + (1 - m)(s - t) in one kernel per group


# ---- losses -------------------------------------------------------------------------------------------


def contrastive_loss(img: Tensor, txt: Tensor, img_ids: Tensor, tau: float,
                     caption_hash: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE over a batch of labelled pairs (row i's image and caption are the positive).

    Negatives sharing row i's image_id (a sibling caption, or the same image drawn twice) are masked, as
    are identical captions (equal ``caption_hash``) on the text side; the positive is never masked.
    Returns ``(CE_i2t + CE_t2i) / 2``.
    """
    logits = img.float() @ txt.float().T / tau
    i2t, t2i = symmetric_infonce(logits, false_negative_mask(img_ids, img_ids, caption_hash, caption_hash))
    return 0.5 * (i2t + t2i)


def consistency_loss(student: Tensor, teacher: Tensor, bank: Tensor, student_tau: float,
                     teacher_tau: float) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy from the teacher's sharper distribution over ``bank`` to the student's.

    Args:
        student: (B, D) student embeddings of one view (gradients flow here).
        teacher: (B, D) EMA-teacher embeddings of another view of the same items (no gradient).
        bank: (K, D) EMA-teacher embeddings of the other modality.
        student_tau, teacher_tau: temperatures; ``teacher_tau < student_tau`` sharpens the target.

    Returns:
        ``mean_b -sum_k q_bk log p_bk`` and diagnostics: teacher entropy (nats) and the fraction of rows
        where the student's top bank entry is the teacher's.
    """
    bank = bank.float().detach()
    log_p = F.log_softmax(student.float() @ bank.T / student_tau, dim=-1)
    q = F.softmax(teacher.float().detach() @ bank.T / teacher_tau, dim=-1)
    loss = -(q * log_p).sum(-1).mean()
    with torch.no_grad():
        entropy = float(-(q * q.clamp_min(1e-12).log()).sum(-1).mean())
        agree = float((log_p.argmax(-1) == q.argmax(-1)).float().mean())
    return loss, {"teacher_entropy": entropy, "agreement": agree}


# ---- embedding bank -----------------------------------------------------------------------------------


class EmbeddingBank(nn.Module):
    """FIFO of the last ``size`` EMA-teacher embeddings of one modality (MoCo-style buffers, so the state
    travels in checkpoints through ``state_dict``)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise PipelineError(f"bank size must be >= 1, got {size}")
        self.register_buffer("emb", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("fill", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.emb.shape[0]

    def __len__(self) -> int:
        return int(self.fill)

    @torch.no_grad()
    def push(self, x: Tensor) -> None:
        """Append rows, overwriting the oldest; a batch larger than the bank keeps its last ``size`` rows."""
        x = x.detach().to(self.emb)[-self.size :]
        n, p = len(x), int(self.ptr)
        first = min(n, self.size - p)
        self.emb[p : p + first] = x[:first]
        self.emb[: n - first] = x[first:]
        self.ptr.fill_((p + n) % self.size)
        self.fill.fill_(min(self.size, int(self.fill) + n))

    def active(self) -> Tensor:
        """The filled rows (order is irrelevant to the loss)."""
        return self.emb[: len(self)]


# ---- labelled / unlabelled split ----------------------------------------------------------------------


def draw_labelled_images(image_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The sorted image ids whose pairs are labelled: ``round(fraction * n_images)`` of them (at least one),
    drawn from a seeded permutation of the sorted unique ids, so the split depends only on (ids, fraction,
    seed) and a smaller fraction's labelled set is contained in a larger one's."""
    if not 0.0 < fraction <= 1.0:
        raise PipelineError(f"labelled_fraction must be in (0, 1], got {fraction}")
    unique = np.unique(np.asarray(image_ids, dtype=np.int64))
    if len(unique) == 0:
        raise PipelineError("no training images to split")
    n = max(1, int(round(fraction * len(unique))))
    order = np.random.default_rng([seed, 0x1ABE1]).permutation(len(unique))
    return np.sort(unique[order[:n]])


def drop_words(caption: str, p: float, rng: np.random.Generator) -> str:
    """Text view for the student: each word dropped with probability ``p``, at least one kept."""
    words = caption.split()
    if p <= 0 or len(words) < 2:
        return caption
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return " ".join(w for w, k in zip(words, keep) if k)


__all__ = ["momentum_at", "ema_update", "contrastive_loss", "consistency_loss", "EmbeddingBank",
           "draw_labelled_images", "drop_words"]
