"""Cached augmented views (dataset reinforcement, issue 13): K seeded random crops per image, embedded by the
teacher once in stage 1 and replayed exactly for the student in stage 2.

A view is a crop box in fractions of the image's width and height (so it means the same region of a
downsized copy) and a horizontal-flip flag. Both models see the view the same way: crop, flip, resize the
crop to a square of their own input size, normalise with their own statistics. With equal sizes and
statistics the two inputs are the same pixels (tests/test_views.py), so the student's target is the
teacher's embedding of what the student sees. The boxes are drawn like RandomResizedCrop: an area fraction
from ``scale`` and an aspect ratio from ``ratio`` (log-uniform), placed uniformly. Flips are off by default:
emoji and icons have left/right meaning ("facing right").

Parameters are a pure function of (view seed, image id, view index): any shard, rerun or machine draws the
same views, and a K-view cache holds the first K views of any larger one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from pipeline.common.errors import PipelineError

PARAMS = ("x0", "y0", "x1", "y1", "flip")  # one row of a cache's view_params
_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@dataclass(frozen=True)
class ViewSpec:
    count: int
    seed: int = 0
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False

    def __post_init__(self):
        if self.count < 0:
            raise PipelineError(f"--views must be >= 0, got {self.count}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise PipelineError(f"--view-scale must be two numbers 0 < a <= b <= 1, got {self.scale}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def params(self, image_id: int) -> np.ndarray:
        """(count, 5) float32 rows of PARAMS for one image."""
        rng = np.random.default_rng([self.seed, int(image_id) & 0xFFFFFFFFFFFFFFFF])
        out = np.zeros((self.count, len(PARAMS)), np.float32)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for k in range(self.count):
            area = rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = min(1.0, math.sqrt(area * aspect)), min(1.0, math.sqrt(area / aspect))
            x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            flip = float(self.flip and rng.random() < 0.5)
            out[k] = (x0, y0, x0 + w, y0 + h, flip)
        return out


def render_view(img: Image.Image, params: np.ndarray, size: int, interpolation: str = "bicubic") -> Image.Image:
    """The view's pixels at ``size`` x ``size``: crop the box (at least one pixel), flip, resize."""
    W, H = img.size
    x0, y0, x1, y1, flip = (float(v) for v in params)
    left, top = min(int(round(x0 * W)), W - 1), min(int(round(y0 * H)), H - 1)
    right, bottom = max(int(round(x1 * W)), left + 1), max(int(round(y1 * H)), top + 1)
    out = img.convert("RGB").crop((left, top, right, bottom))
    if flip >= 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out.resize((size, size), _INTERP[interpolation])


@dataclass(frozen=True)
class ViewTransform:
    """(PIL image, view params) -> normalised (3, size, size) tensor: a model's input for a recorded view."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __post_init__(self):
        if self.interpolation not in _INTERP:
            raise PipelineError(f"view replay supports {sorted(_INTERP)} resizing, not {self.interpolation!r}")

    def __call__(self, img: Image.Image, params: np.ndarray) -> torch.Tensor:
        return self.to_input(self.render(img, params))

    def render(self, img: Image.Image, params: np.ndarray) -> Image.Image:
        """The view's pixels at the model's size, cropped from the full-resolution image (what may be kept)."""
        return render_view(img, params, self.size, self.interpolation)

    def to_input(self, crop: Image.Image) -> torch.Tensor:
        """A rendered view as the model's input."""
        return TF.normalize(TF.to_tensor(crop), list(self.mean), list(self.std))


class BoundView:
    """A ViewTransform with one view's parameters: an ordinary image transform (for the stage-1 loader)."""

    def __init__(self, transform: ViewTransform, params: np.ndarray):
        self.transform, self.params = transform, params

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transform(img, self.params)


def teacher_view_transform(teacher) -> ViewTransform:
    """The teacher's input for a view: its crop size, interpolation and statistics (from its tensor form)."""
    pre = teacher.tensor_preprocess()
    if pre is None:
        raise PipelineError(f"--views needs a teacher whose preprocessing is known (open_clip, dual: and trained "
                            f"students); teacher {teacher.name} does not state it")
    return ViewTransform(pre.crop, tuple(pre.mean), tuple(pre.std), pre.interpolation)


def student_view_transform(settings) -> ViewTransform:
    """A student's input for a view (its TransformSettings): no other augmentation, so the pixels match."""
    return ViewTransform(settings.size, tuple(settings.mean), tuple(settings.std), settings.interpolation)


def pick_view(seed: int, epoch: int, index: int, views: int) -> int:
    """Which of the first ``views`` cached views item ``index`` uses in ``epoch``: a pure function (resume)."""
    return int(np.random.default_rng([seed, epoch, index, 0x76696577]).integers(views))
