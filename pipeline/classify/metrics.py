"""Classification measures: top-k accuracy and balanced top-1 (every val/test number of head, probe and students)."""

from __future__ import annotations

from typing import Sequence

import torch


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


__all__ = ["topk_accuracy"]
