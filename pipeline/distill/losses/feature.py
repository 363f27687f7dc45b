"""FD: feature distillation, L1 (method.md 1.2) or MSE (CLIP-KD)."""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.common.errors import PipelineError
from pipeline.distill.losses.common import LossInputs, _check_pair, _f32


FD_KINDS = ("l1", "mse")


class FeatureDistillLoss(nn.Module):
    """Element-wise distance between student and teacher embeddings, mean over B x D, per modality.

    ``kind="l1"`` is method.md 1.2 (the default); ``kind="mse"`` is the squared error of CLIP-KD's feature
    distillation, for the ablation. Returns ``{"fd_img", "fd_txt", "fd"}``.
    """

    def __init__(self, kind: str = "l1") -> None:
        super().__init__()
        if kind not in FD_KINDS:
            raise PipelineError(f"feature distillation kind must be one of {', '.join(FD_KINDS)}, "
                                f"not {kind!r}")
        self.kind = kind

    def _distance(self, s: Tensor, t: Tensor) -> Tensor:
        diff = _f32(s) - _f32(t)
        return diff.abs().mean() if self.kind == "l1" else diff.square().mean()

    def forward(self, s_img: Tensor, s_txt: Tensor, t_img: Tensor, t_txt: Tensor) -> dict[str, Tensor]:
        _check_pair(s_img, t_img, "feature distillation (image)")
        _check_pair(s_txt, t_txt, "feature distillation (text)")
        fi, ft = self._distance(s_img, t_img), self._distance(s_txt, t_txt)
        return {"fd_img": fi, "fd_txt": ft, "fd": fi + ft}

    def of(self, x: LossInputs) -> dict[str, Tensor]:
        s_img, t_img, _ = x.images()  # the per-modality terms also cover transfer images and captions
        s_txt, t_txt, _, _ = x.texts()
        return self(s_img, s_txt, t_img, t_txt)
