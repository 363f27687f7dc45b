"""A teacher's eval preprocessing stated as tensor ops (``Teacher.tensor_preprocess``).

It lives with the teachers, which state it, so that teachers never import stage 1; stage 1's device input
path (``features.device_input``) runs it on decoded uint8 images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pipeline.common.errors import PipelineError

INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class TensorPreprocess:
    """A teacher's eval preprocessing as tensor ops: shorter side to ``resize`` (antialiased, as PIL does),
    center crop ``crop``, scale to [0, 1], normalise by ``mean``/``std``."""

    resize: int
    crop: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise PipelineError(f"device preprocessing supports {INTERPOLATIONS}, not {self.interpolation!r}")
        if self.crop > self.resize:
            raise PipelineError(f"center crop {self.crop} is larger than the resized side {self.resize}")

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 (3, H, W) images, any sizes, on one device -> float (B, 3, crop, crop)."""
        from torchvision.transforms.v2 import functional as TF

        mode = TF.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
        # Resized in uint8 like PIL (which rounds and clamps to 0..255 after its resize), one image at a time
        # since sizes differ; the crop is a view, the float conversion happens once on the stacked batch.
        crops = [TF.center_crop(TF.resize(img, [self.resize], interpolation=mode, antialias=True), [self.crop])
                 for img in images]
        batch = torch.stack(crops).float().div_(255.0)
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return batch.sub_(mean).div_(std)


__all__ = ["INTERPOLATIONS", "TensorPreprocess"]
