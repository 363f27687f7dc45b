"""Hugging Face ``transformers`` CLIP / SigLIP teacher (hub name or local ``save_pretrained`` directory)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import torch
from PIL import Image

from pipeline.common.precision import autocast, check_precision
from pipeline.common.errors import PipelineError, first_line
from pipeline.teachers.base import Teacher, state_dict_digest

# Model types whose processor yields plain ``pixel_values`` and whose ``get_*_features`` need nothing else.
# (SigLIP 2 needs patch masks and spatial shapes, so it is not listed.)
SUPPORTED_MODEL_TYPES = ("clip", "siglip")
class HFImageTransform:
    """PIL image -> CHW tensor via a HF image processor; a plain class so DataLoader workers can pickle it."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class HFTeacher(Teacher):
    """Frozen ``CLIPModel`` / ``SiglipModel`` loaded with ``AutoModel``.

    Args:
        name_or_dir: hub model id (needs a network) or a local directory written by ``save_pretrained``.
        precision: ``auto`` (bf16/fp16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``.
    """

    def __init__(self, name_or_dir: str, precision: str = "auto"):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        self.precision = check_precision(precision)
        self.local = os.path.isdir(name_or_dir)
        self.source = name_or_dir
        try:
            config = AutoConfig.from_pretrained(name_or_dir)
        except (OSError, ValueError) as e:
            msg = f"cannot load Hugging Face model config from {name_or_dir!r}: {first_line(e)}"
            raise PipelineError(msg) from e
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise PipelineError(
                f"hf teacher {name_or_dir!r} is a {config.model_type!r} model; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.is_siglip = config.model_type == "siglip"
        try:
            # fp32 weights whatever the checkpoint dtype: autocast picks the compute dtype per device.
            self.model = AutoModel.from_pretrained(name_or_dir, dtype=torch.float32)
            self.processor = AutoImageProcessor.from_pretrained(name_or_dir)
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
        except (OSError, ValueError) as e:
            msg = f"cannot load Hugging Face model from {name_or_dir!r}: {first_line(e)}"
            raise PipelineError(msg) from e
        self.model.eval().requires_grad_(False)
        self.config = config
        self.width = _embed_width(config)
        self.max_length = int(config.text_config.max_position_embeddings)
        tail = name_or_dir.rstrip("/\\").replace("\\", "/").split("/")[-1]
        self.name = f"hf-{tail}"
        self._weights_digest: str | None = None


    @classmethod
    def from_spec(cls, arg: str) -> "HFTeacher":
        if not arg:
            raise PipelineError("hf teacher needs a model name or directory, e.g. hf:openai/clip-vit-base-patch32")
        return cls(arg)

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return HFImageTransform(self.processor)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        # SigLIP was trained on max-length padded text pooled at the last position, without an attention mask.
        enc = self.tokenizer(
            list(texts),
            padding="max_length" if self.is_siglip else True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        keys = ("input_ids",) if self.is_siglip else ("input_ids", "attention_mask")
        return {k: enc[k] for k in keys if k in enc}

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return _features(self.model.get_image_features(pixel_values=pixels))

    def _encode_texts(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return _features(self.model.get_text_features(**tokens))

    @torch.no_grad()
    def image_tokens(self, pixels: torch.Tensor):
        """The vision model's patch tokens (CLIP: class token dropped; SigLIP: all); pooled = the projected
        image embedding before normalising."""
        with autocast(self.device, self.precision):
            out = self.model.vision_model(pixel_values=pixels.to(self.device))
            pooled = out.pooler_output if self.is_siglip else self.model.visual_projection(out.pooler_output)
        hidden = out.last_hidden_state.float()
        tokens = hidden if self.is_siglip else hidden[:, 1:]
        pooled = pooled.float()
        return tokens, pooled, torch.nn.functional.normalize(pooled, dim=-1)

    def token_arch(self) -> dict:
        vision = self.model.config.vision_config
        return {"kind": "hf", "name": vision.model_type, "kwargs": {
            "config": vision.to_dict(), "mean": list(self.processor.image_mean), "std": list(self.processor.image_std)}}

    def fingerprint_parts(self) -> dict:
        if self._weights_digest is None:  # frozen weights: hash once, lazily (large models take seconds)
            self._weights_digest = state_dict_digest(self.model)
        vocab = json.dumps(sorted(self.tokenizer.get_vocab().items()), ensure_ascii=False)
        return {
            # A local directory is identified by its contents, so moving it keeps cached targets valid.
            "source": None if self.local else self.source,
            "config": _digest(_clean_config(self.config.to_dict())),
            "weights": self._weights_digest,
            "processor": {
                "class": type(self.processor).__name__,
                **_json_safe(_clean_config(self.processor.to_dict())),
            },
            "tokenizer": {
                "class": type(self.tokenizer).__name__,
                "vocab": _digest(vocab),
                "max_length": self.max_length,
                "padding": "max_length" if self.is_siglip else "longest",
            },
            "precision": self.precision,
        }


def _embed_width(config: Any) -> int:
    if config.model_type == "siglip":
        # SigLIP has no shared projection: text head -> projection_size, image pooler -> hidden_size.
        text, image = int(config.text_config.projection_size), int(config.vision_config.hidden_size)
        if text != image:
            raise PipelineError(f"SigLIP text width {text} differs from image width {image}")
        return text
    return int(config.projection_dim)


def _features(out: Any) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output holds the projected features.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _clean_config(d: Any) -> Any:
    """Drop keys that name paths or library versions rather than anything that affects the embeddings."""
    if isinstance(d, dict):
        skip = {"_name_or_path", "transformers_version", "_commit_hash", "processor_class"}
        return {k: _clean_config(v) for k, v in d.items() if k not in skip}
    return d


def _json_safe(d: Any) -> Any:
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def _digest(obj: Any) -> str:
    blob = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
