"""open_clip teacher: an open_clip architecture with a pretrained tag, a local checkpoint or a config dict."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable

import open_clip
import torch
from PIL import Image

from pipeline.common.errors import PipelineError, first_line
from pipeline.teachers.base import Teacher, state_dict_digest
from pipeline.common.precision import autocast, check_precision


def split_arg(arg: str) -> tuple[str, str | None]:
    """``ARCH[/TAG|/CHECKPOINT|/DIR]`` -> (architecture, tag or path or None)."""
    arch, _, pretrained = arg.partition("/")
    if not arch:
        raise PipelineError("openclip teacher needs an architecture, e.g. openclip:ViT-B-32/laion2b_s34b_b79k")
    return arch, pretrained or None


class OpenClipTeacher(Teacher):
    """Frozen open_clip model with its eval preprocessing and tokenizer.

    Args:
        arch: open_clip architecture (``ViT-B-32``, ...), or ``hf-hub:org`` / ``hf-hub:org/repo``.
        pretrained: a pretrained tag (downloaded), a checkpoint file, a directory holding
            ``open_clip_config.json`` plus weights, or None for random weights (tests only).
        model_cfg: architecture config (``embed_dim``, ``vision_cfg``, ``text_cfg``) to register under
            ``arch``, for custom or tiny models that open_clip does not ship.
        precision: ``auto`` (bf16/fp16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``.
    """

    def __init__(
        self,
        arch: str,
        pretrained: str | None = None,
        model_cfg: dict | None = None,
        precision: str = "auto",
    ):
        self.precision = check_precision(precision)
        if model_cfg is not None:
            register_model_config(arch, model_cfg)
        model_name, weights, self.tag = _resolve(arch, pretrained)
        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise PipelineError(f"unknown open_clip architecture {arch!r} (see open_clip.list_models())")
        # Tags record whether their weights were trained with QuickGELU; the bare arch config may not.
        quick_gelu = bool(self.tag and open_clip.get_pretrained_cfg(model_name, self.tag).get("quick_gelu"))
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=weights, force_quick_gelu=quick_gelu
            )
        except (RuntimeError, ValueError, OSError, pickle.UnpicklingError) as e:
            msg = f"cannot load open_clip {arch!r} from {pretrained!r}: {first_line(e)}"
            raise PipelineError(msg) from e
        self.model = model.eval().requires_grad_(False)
        self._transform = preprocess
        self._tokenizer = open_clip.get_tokenizer(model_name)
        if quick_gelu:
            cfg["quick_gelu"] = True
        self.model_cfg = cfg
        self.preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(self.model))
        self.width = int(cfg["embed_dim"])
        self.arch = arch
        self.name = "openclip-" + arch.replace("hf-hub:", "").replace("/", "-").replace(":", "-")
        self._weights_digest: str | None = None

    @classmethod
    def from_spec(cls, arg: str) -> "OpenClipTeacher":
        return cls(*split_arg(arg))

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self._transform

    def tensor_preprocess(self):
        from pipeline.teachers.preprocess import INTERPOLATIONS, TensorPreprocess

        cfg = self.preprocess_cfg
        size = cfg.get("size", 224)
        size = size if isinstance(size, int) else (size[0] if size[0] == size[1] else None)
        # open_clip's eval transform for square 'shortest' models: Resize(size) + CenterCrop(size) + Normalize
        if size is None or cfg.get("resize_mode", "shortest") != "shortest" \
                or cfg.get("interpolation", "bicubic") not in INTERPOLATIONS:
            return None
        return TensorPreprocess(size, size, cfg.get("interpolation", "bicubic"), tuple(cfg["mean"]), tuple(cfg["std"]))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(list(texts))

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return self.model.encode_image(pixels)

    def _encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return self.model.encode_text(tokens)

    @torch.no_grad()
    def image_tokens(self, pixels: torch.Tensor):
        """A ViT's patch tokens after ``ln_post``; pooled = the projected image embedding before normalising."""
        self.token_arch()  # refuses a tower without tokens
        visual = self.model.visual
        before = visual.output_tokens
        visual.output_tokens = True
        try:
            with autocast(self.device, self.precision):
                pooled, tokens = visual(pixels.to(self.device))
        finally:
            visual.output_tokens = before
        pooled = pooled.float()
        return tokens.float(), pooled, torch.nn.functional.normalize(pooled, dim=-1)

    def token_arch(self) -> dict:
        if not hasattr(self.model.visual, "output_tokens"):
            raise PipelineError(f"open_clip teacher {self.arch}: token features need a ViT image tower")
        cfg = self.model_cfg
        return {
            "kind": "open_clip",
            "name": "",
            "kwargs": {
                "embed_dim": cfg["embed_dim"],
                "vision_cfg": cfg["vision_cfg"],
                **({"quick_gelu": True} if cfg.get("quick_gelu") else {}),
                "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v
                                   for k, v in self.preprocess_cfg.items() if k in ("mean", "std")},
            },
        }

    def fingerprint_parts(self) -> dict:
        if self._weights_digest is None:  # frozen weights: hash once, lazily (large models take seconds)
            self._weights_digest = state_dict_digest(self.model)
        return {
            "arch": self.arch,
            # Local checkpoints are identified by the weights digest, so moving the file keeps caches valid.
            "pretrained": self.tag,
            "weights": self._weights_digest,
            "model_cfg": self.model_cfg,
            "preprocess": self.preprocess_cfg,
            "tokenizer": {
                "class": type(self._tokenizer).__name__,
                "context_length": getattr(self._tokenizer, "context_length", None),
            },
            "precision": self.precision,
        }


def register_model_config(arch: str, model_cfg: dict) -> None:
    """Make ``arch`` resolvable by open_clip (and hence by ``load_teacher('openclip:ARCH/...')``).

    Uses open_clip's public ``add_model_config``, which reads a ``<arch>.json`` file; the registry keeps the
    parsed config, so the file can live in a temporary directory.
    """
    if "/" in arch or ":" in arch or not arch:
        raise PipelineError(f"open_clip arch name {arch!r} must be non-empty, without '/' or ':'")
    cfg = json.loads(json.dumps(model_cfg))  # tuples -> lists, as open_clip's JSON registry stores them
    existing = open_clip.get_model_config(arch)
    if existing is not None:
        if existing != cfg:
            raise PipelineError(f"open_clip architecture {arch!r} is already defined with a different config")
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{arch}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
    if open_clip.get_model_config(arch) is None:
        raise PipelineError(f"open_clip model_cfg for {arch!r} needs embed_dim, vision_cfg and text_cfg")


def _resolve(arch: str, pretrained: str | None) -> tuple[str, str | None, str | None]:
    """-> (open_clip model name, ``pretrained`` argument for open_clip, pretrained tag or None)."""
    if arch.startswith("hf-hub:"):
        # ``openclip:hf-hub:org/repo`` reaches us split at the first '/': join it back.
        return (f"{arch}/{pretrained}" if pretrained else arch), None, None
    if pretrained is None:
        return arch, None, None
    if open_clip.get_pretrained_cfg(arch, pretrained):
        return arch, pretrained, pretrained
    if os.path.isdir(pretrained):
        if not os.path.isfile(os.path.join(pretrained, "open_clip_config.json")):
            raise PipelineError(f"open_clip checkpoint directory {pretrained!r} has no open_clip_config.json")
        return f"local-dir:{pretrained}", None, None
    if os.path.isfile(pretrained):
        return arch, pretrained, None
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
    raise PipelineError(
        f"{pretrained!r} is neither a pretrained tag of open_clip {arch!r} nor an existing checkpoint "
        f"(tags: {tags})"
    )


__all__ = ["OpenClipTeacher", "register_model_config"]
