"""The soft-target loss every classification trainer distils with (the head's, the probe's and each generation's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """mean_i -sum_c p_ic log softmax(logits_i / T)_c, with p the teacher's soft targets (rows sum to 1).

    Scaled by T^2 (Hinton et al.) so the gradient size does not depend on the temperature.
    """
    logp = F.log_softmax(logits / temperature, dim=-1)
    return -(targets * logp).sum(-1).mean() * temperature**2


__all__ = ["soft_cross_entropy"]
