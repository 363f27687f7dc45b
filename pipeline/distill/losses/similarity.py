"""SD: similarity distillation of the in-batch similarity matrices (method.md 1.3)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill.losses.common import LossInputs, _check_pair, _f32


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

    def of(self, x: LossInputs) -> dict[str, Tensor]:
        s_img, t_img, _ = x.images()  # the per-modality terms also cover transfer images and captions
        s_txt, t_txt, _, _ = x.texts()
        return self(s_img, s_txt, t_img, t_txt)
