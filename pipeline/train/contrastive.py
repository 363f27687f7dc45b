"""The one symmetric InfoNCE (CLIP objective) and false-negative mask, used by every trainer that needs them:
the ``pair`` loss of stage 2, the labelled loss of adaptation and the LiT head trainer."""

from __future__ import annotations

import torch
from torch import Tensor


def false_negative_mask(row_ids: Tensor, other_ids: Tensor, row_hash: Tensor | None = None,
                        other_hash: Tensor | None = None) -> Tensor:
    """(B, K) bool: True where entry k is no negative of row b (same image_id, or the same caption hash)."""
    mask = row_ids[:, None] == other_ids[None, :]
    if row_hash is not None and other_hash is not None:
        mask |= row_hash[:, None] == other_hash[None, :]
    return mask


def symmetric_infonce(logits: Tensor, ignore: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(image->text, text->image) mean cross-entropies of a (B, B) logit matrix whose diagonal holds the positives.

    ``ignore`` (B, B) bool drops off-diagonal entries that are not negatives (a sibling caption, an identical
    caption); the diagonal is never dropped, so every row keeps a finite softmax.
    """
    if ignore is not None:
        eye = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(ignore & ~eye, float("-inf"))
    diag = logits.diagonal()
    return (torch.logsumexp(logits, dim=1) - diag).mean(), (torch.logsumexp(logits, dim=0) - diag).mean()
