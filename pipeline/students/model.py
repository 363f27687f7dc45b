"""The student dual encoder: towers + linear projections to D, L2-normalised outputs (method.md notation)."""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.common.errors import PipelineError
from pipeline.students.config import StudentConfig
from pipeline.students.preprocess import ImageTransform, TextTokenizer, TransformSettings
from pipeline.students.towers import build_image_tower, build_text_tower


class StudentModel(nn.Module):
    """``s_img = n(P_img(S_img(image)))``, ``s_txt = n(P_txt(S_txt(caption)))``.

    Preprocessing travels with the model: ``image_transform(train)`` and ``tokenizer(captions)``.
    ``resolved_config`` is the config with external weight references inlined (what exports store).
    """

    def __init__(
        self,
        config: StudentConfig,
        image_tower: nn.Module,
        image_width: int,
        text_tower: nn.Module,
        text_width: int,
        transform: TransformSettings,
        tokenizer: TextTokenizer,
        resolved_config: StudentConfig | None = None,
    ):
        super().__init__()
        self.config = config
        self.resolved_config = resolved_config or config
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_proj = nn.Linear(image_width, config.embed_dim, bias=config.proj_bias)
        self.text_proj = nn.Linear(text_width, config.embed_dim, bias=config.proj_bias)
        self.transform_settings = transform
        self.tokenizer = tokenizer

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def image_transform(self, train: bool = False) -> ImageTransform:
        return ImageTransform(self.transform_settings, train=train)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised image embeddings (B, D)."""
        # the tower's layout whatever the caller's (a convolution follows its input's layout: NHWC pixels would
        # make an NCHW student run NHWC kernels, with other sums); a no-op when they already agree
        pixels = pixels.contiguous(memory_format=torch.channels_last if self.config.channels_last
                                   else torch.contiguous_format)
        return self.image_proj(self.image_tower(pixels))

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Projected, unnormalised text embeddings (B, D)."""
        return self.text_proj(self.text_tower(tokens["input_ids"], tokens.get("attention_mask")))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(pixels), dim=-1)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.text_features(tokens), dim=-1)

    def forward(
        self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both sides; ``tokens`` None runs the image side alone (a student whose text side is the teacher's
        trains against the cached caption embeddings), through the same call, so DDP wraps it either way."""
        return self.encode_image(pixels), None if tokens is None else self.encode_text(tokens)


def build_student(
    config: StudentConfig,
    *,
    tokenizer: TextTokenizer | None = None,
    load_weights: bool = True,
    device: str | torch.device | None = None,
) -> StudentModel:
    """Build a student from its config.

    Args:
        config: architecture + preprocessing; ``get_preset(name, D)`` gives the named ones.
        tokenizer: use this tokenizer instead of loading ``config.text.tokenizer`` (exports pass theirs).
        load_weights: False skips local pretrained weights (e.g. to count params/FLOPs, or before a
            state dict is loaded anyway).
        device: build directly on this device; ``"meta"`` allocates nothing (shapes only) and implies
            ``load_weights=False``.
    """
    if device is not None and torch.device(device).type == "meta":
        load_weights = False
    if config.init == "random":
        load_weights = False  # on purpose: the run's log and config say so
    if tokenizer is None:
        tokenizer = _make_tokenizer(config)
    if tokenizer.max_len != config.max_text_len:
        raise PipelineError(f"tokenizer max_len {tokenizer.max_len} != max_text_len {config.max_text_len}")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        image_tower, image_width, transform, image_spec = build_image_tower(
            config.image, config.image_size, load_weights=load_weights,
            train_scale=config.train_crop_scale, hflip=config.train_hflip,
        )
        text_tower, text_width, text_spec = build_text_tower(
            config.text, config.max_text_len, tokenizer.vocab_size, load_weights=load_weights
        )
        transform = dataclasses.replace(transform, color_jitter=config.train_color_jitter,
                                        grayscale=config.train_grayscale)
        if config.channels_last:
            image_tower.to(memory_format=torch.channels_last)  # 4-d conv weights only
        if config.freeze_text_embeddings:
            text_tower.token_embedding().requires_grad_(False)
        resolved = dataclasses.replace(config, image=image_spec, text=text_spec)
        return StudentModel(
            config, image_tower, image_width, text_tower, text_width, transform, tokenizer, resolved
        )


def _make_tokenizer(config: StudentConfig) -> TextTokenizer:
    if config.text.kind == "open_clip":
        return TextTokenizer("open_clip", config.max_text_len)
    source = config.text.tokenizer or config.text.pretrained
    if source is None:
        raise PipelineError("an hf text tower needs text.tokenizer (a tokenizer directory or 'minilm')")
    return TextTokenizer.from_dir(source, config.max_text_len)

