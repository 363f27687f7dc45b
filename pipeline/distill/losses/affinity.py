"""affinity: cross-modal affinity mimicking (as in TinyCLIP), an extra loss for the teacher's world (issue 12).

The DSMD terms align each student embedding with the teacher's own (CD, FD, SD) or rank within one matrix
(HND). This one transfers the teacher's *cross-modal* judgement: for every image of the batch, the teacher's
softmax over the batch's captions is the soft target of the student's, and the same for every caption over the
images. With S = s_img s_txt^T / tau and T = t_img t_txt^T / tau, ``affinity_i2t`` = mean_i KL(softmax(T_i) ||
softmax(S_i)) and ``affinity_t2i`` the same over columns; ``affinity`` is their sum. No false-negative mask: a
sibling caption's teacher probability is the soft target's own way of sharing the mass.
Turn it on with ``--set 'losses.extra={affinity: {tau: 0.05}}'``.

``rows: all`` (issue 13) takes every image and every caption of the step, transfer rows included: the teacher's
softmax of a caption-less image over the step's captions is defined without a partner, so unpaired data, which
otherwise reaches only the per-modality terms, also carries the teacher's cross-modal judgement (the
image-text similarity matrix that MobileCLIP's reinforced training distils). ``rows: pairs`` (the default) keeps
the paired rows only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.common.errors import PipelineError
from pipeline.distill.losses.common import LossInputs, _check_pair, _f32


def soft_cross_modal_kl(s_img: Tensor, s_txt: Tensor, t_img: Tensor, t_txt: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """(image->text, text->image) mean KL(teacher || student) of the batch's cross-modal softmaxes."""
    s = (_f32(s_img) @ _f32(s_txt).t()) / tau
    t = (_f32(t_img) @ _f32(t_txt).t()) / tau
    i2t = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)
    t2i = F.kl_div(F.log_softmax(s.t(), dim=1), F.log_softmax(t.t(), dim=1), reduction="batchmean", log_target=True)
    return i2t, t2i


class AffinityDistillLoss(nn.Module):
    ROWS = ("pairs", "all")

    def __init__(self, tau: float = 0.05, rows: str = "pairs") -> None:
        super().__init__()
        if tau <= 0:
            raise PipelineError(f"losses.extra.affinity.tau must be > 0, got {tau}")
        if rows not in self.ROWS:
            raise PipelineError(f"losses.extra.affinity.rows must be one of {', '.join(self.ROWS)}, not {rows!r}")
        self.tau = float(tau)
        self.rows = rows

    def forward(self, s_img: Tensor, s_txt: Tensor, t_img: Tensor, t_txt: Tensor) -> dict[str, Tensor]:
        _check_pair(s_img, t_img, "affinity distillation (image)")
        _check_pair(s_txt, t_txt, "affinity distillation (text)")
        i2t, t2i = soft_cross_modal_kl(s_img, s_txt, t_img, t_txt, self.tau)
        return {"affinity_i2t": i2t, "affinity_t2i": t2i, "affinity": i2t + t2i}

    def of(self, x: LossInputs) -> dict[str, Tensor]:
        if self.rows == "pairs":
            return self(x.s_img, x.s_txt, x.t_img, x.t_txt)
        s_img, t_img, _ = x.images()
        s_txt, t_txt, _, _ = x.texts()
        return self(s_img, s_txt, t_img, t_txt)
