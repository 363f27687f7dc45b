"""HND: hard-negative (max-violation) distillation over four student->teacher pairs (method.md 1.4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.distill.losses.common import LossInputs, _check_pair, _f32, _ids
from pipeline.train.contrastive import false_negative_mask


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
        all_images: tuple[Tensor, Tensor, Tensor] | None = None,
        all_texts: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = None,
    ) -> dict[str, Tensor]:
        """``all_images``: (student, teacher, ids) of every image of the step, pairs' and transfer images, for
        the image-image term (default: the pairs' images); ``all_texts``: (student, teacher, ids, hashes) of
        every caption, for the text-text term."""
        _check_pair(s_img, t_img, "hard-negative distillation (image)")
        _check_pair(s_txt, t_txt, "hard-negative distillation (text)")
        dev = s_img.device
        ids = _ids(img_ids, dev)
        h = _ids(captions_hash, dev)
        img_mask = false_negative_mask(ids, ids)  # includes the diagonal, as every row shares its own id
        txt_mask = false_negative_mask(ids, ids, h, h)
        m = self.margin
        if all_images is not None and len(all_images[0]) != len(s_img):
            all_s, all_t, all_ids = all_images
            _check_pair(all_s, all_t, "hard-negative distillation (all images)")
            all_ids = _ids(all_ids, dev)
            img_img = max_violation_triplet(all_s, all_t, m, false_negative_mask(all_ids, all_ids))
        else:
            img_img = max_violation_triplet(s_img, t_img, m, img_mask)
        if all_texts is not None and len(all_texts[0]) != len(s_txt):
            all_s, all_t, all_ids, all_h = all_texts
            _check_pair(all_s, all_t, "hard-negative distillation (all captions)")
            all_ids, all_h = _ids(all_ids, dev), _ids(all_h, dev)
            txt_txt = max_violation_triplet(all_s, all_t, m, false_negative_mask(all_ids, all_ids, all_h, all_h))
        else:
            txt_txt = max_violation_triplet(s_txt, t_txt, m, txt_mask)
        out = {
            "hnd_img_img": img_img,
            "hnd_txt_txt": txt_txt,
            "hnd_img_txt": max_violation_triplet(s_img, t_txt, m, txt_mask),
            "hnd_txt_img": max_violation_triplet(s_txt, t_img, m, txt_mask),
        }
        out["hnd"] = torch.stack(list(out.values())).sum()
        return out

    def of(self, x: LossInputs) -> dict[str, Tensor]:
        return self(x.s_img, x.s_txt, x.t_img, x.t_txt, x.img_ids, x.captions_hash, all_images=x.images(),
                    all_texts=x.texts())
