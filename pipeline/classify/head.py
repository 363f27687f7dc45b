"""The image-text representation head, the text-free linear probe, and the classification losses/metrics.

Head (method.md 4, step 1): ``y_hat = softmax(W . Attention(Q = t', K = x', V = x'))`` with x' the teacher's
image tokens and t' text embeddings. Two text modes:

- ``captions``: one query per (image, caption) row, t' = that caption's embedding; W maps the attended
  vector to K logits. An image's prediction is the mean of its captions' probabilities.
- ``prompts``: the K class prompts ("a photo of a {label}") are K queries shared by every image, and
  logit c = w_c . z_c + b_c reads class c's attended vector z_c. Decision: the prompt of the image's own
  label is never the only query, since that would hand the head its label and leave nothing to predict
  on unlabelled or test images.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("prompts", "captions")


class RepresentationHead(nn.Module):
    """Multi-head cross-attention from text queries to image tokens, then a linear classifier.

    Args:
        token_dim: C, width of the image tokens.
        text_dim: D, width of the text embeddings.
        num_classes: K.
        dim: attention width (split over ``heads``).
        mode: ``prompts`` or ``captions`` (module docstring).
    """

    def __init__(
        self,
        token_dim: int,
        text_dim: int,
        num_classes: int,
        dim: int = 256,
        heads: int = 4,
        dropout: float = 0.1,
        mode: str = "prompts",
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if dim % heads:
            raise ValueError(f"head dim {dim} is not divisible by {heads} heads")
        self.mode, self.heads, self.dim, self.num_classes = mode, heads, dim, num_classes
        # Token features of frozen CNNs/ViTs have very different scales per channel; LayerNorm evens them.
        self.norm_tokens = nn.LayerNorm(token_dim)
        self.q = nn.Linear(text_dim, dim)
        self.k = nn.Linear(token_dim, dim)
        self.v = nn.Linear(token_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def attend(self, tokens: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T, C), queries (B, Q, D) or (Q, D) shared by every image -> (attended (B, Q, dim),
        weights (B, heads, Q, T))."""
        b, t, _ = tokens.shape
        x = self.norm_tokens(tokens)
        h, dh = self.heads, self.dim // self.heads
        # shared queries (the class prompts) are projected once, not once per image: a third of the head's work
        q = self.q(queries).view(b if queries.dim() == 3 else 1, -1, h, dh).transpose(1, 2)  # (B or 1, h, Q, dh)
        k = self.k(x).view(b, t, h, dh).transpose(1, 2)  # (B, h, T, dh)
        v = self.v(x).view(b, t, h, dh).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)  # (B, h, Q, T)
        z = (weights @ v).transpose(1, 2).reshape(b, -1, self.dim)  # (B, Q, dim)
        return self.norm_out(self.out(z)), weights

    def forward(self, tokens: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Logits (B, K). queries: (B, D) captions, or (K, D) / (B, K, D) class prompts."""
        if self.mode == "captions":
            z, _ = self.attend(tokens, queries.unsqueeze(1))
            return self.classifier(self.drop(z[:, 0]))
        z, _ = self.attend(tokens, queries)
        return (self.drop(z) * self.classifier.weight).sum(-1) + self.classifier.bias


class LinearProbe(nn.Module):
    """Text-free teacher: standardised pooled image features -> K logits (statistics from the train split)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.linear = nn.Linear(in_dim, num_classes)

    def set_input_stats(self, feats: torch.Tensor) -> None:
        self.mean.copy_(feats.mean(0))
        self.std.copy_(feats.std(0).clamp(min=1e-4))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear((feats - self.mean) / self.std)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """mean_i -sum_c p_ic log softmax(logits_i / T)_c, with p the teacher's soft targets (rows sum to 1).

    Scaled by T^2 (Hinton et al.) so the gradient size does not depend on the temperature.
    """
    logp = F.log_softmax(logits / temperature, dim=-1)
    return -(targets * logp).sum(-1).mean() * temperature**2


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Percent of rows whose label is among the k highest logits (k capped at the number of classes), and
    ``balanced_top1``: the top-1 accuracy of each class present in ``labels``, averaged over those classes (a
    split whose class mix differs from training's then weighs every class alike)."""
    out = {}
    if len(labels) == 0:
        return {**{f"top{k}": float("nan") for k in ks}, "balanced_top1": float("nan")}
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels.view(-1, 1)
    for k in ks:
        out[f"top{k}"] = float(hit[:, : min(k, kmax)].any(1).float().mean() * 100)
    present, index = labels.unique(return_inverse=True)
    per_class = torch.zeros(len(present), dtype=torch.float64).index_add_(0, index, hit[:, 0].double())
    out["balanced_top1"] = float((per_class / index.bincount(minlength=len(present))).mean() * 100)
    return out


__all__ = ["RepresentationHead", "LinearProbe", "soft_cross_entropy", "topk_accuracy", "MODES"]
