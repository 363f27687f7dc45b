"""pair: the plain CLIP objective on the ground-truth pairs (no teacher): the no-distillation baseline."""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.common.errors import PipelineError
from pipeline.distill.losses.common import LossInputs, _check_pair, _f32, _ids
from pipeline.train.contrastive import false_negative_mask, symmetric_infonce


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

    def of(self, x: LossInputs) -> dict[str, Tensor]:
        return self(x.s_img, x.s_txt, x.img_ids, x.captions_hash)
