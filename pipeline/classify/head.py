"""The image-text representation head and the text-free linear probe (the two step-1 models).

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

import torch
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


__all__ = ["RepresentationHead", "LinearProbe", "MODES"]
