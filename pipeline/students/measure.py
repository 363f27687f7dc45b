"""Model size and cost: parameters per tower and FLOPs per item, for students and the offline LiT teacher.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one dummy item (it counts matmuls,
convolutions and attention as 2 x multiply-accumulates; elementwise ops are not counted). Captions are
measured at ``TEXT_LEN`` tokens (including [CLS]/[SEP]), the teacher's truncation length; open_clip
text towers always run at their full context length, so they are measured at that.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.students.config import StudentConfig, get_preset
from pipeline.students.model import StudentModel, build_student

TEXT_LEN = 32


def _numel(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def count_params(model: StudentModel) -> dict[str, int]:
    """Parameters per tower (projection included), in total, and how many of them are trainable."""
    image, text = _numel(model.image_tower, model.image_proj), _numel(model.text_tower, model.text_proj)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"image": image, "text": text, "total": image + text, "trainable": trainable}


def _flops(fn, *args, **kwargs) -> int:
    # Attention is counted on the math path: the fused CPU kernel (aten._scaled_dot_product_flash_attention_for_cpu)
    # has no formula in FlopCounterMode and would count as 0, while a meta-device model falls back to the math
    # path (two bmm). Forcing MATH makes the count the same on every device and torch version.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def flops_per_item(model: StudentModel, text_len: int = TEXT_LEN) -> dict[str, int]:
    """Forward FLOPs for one image and one caption of ``text_len`` tokens (works on a meta-device model)."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    size = model.config.image_size
    if model.config.text.kind == "open_clip":
        text_len = model.config.max_text_len
    pixels = torch.zeros(1, 3, size, size, device=device)
    # No attention mask: an all-ones mask costs the same, and transformers' mask logic reads tensor
    # values, which a meta-device model cannot.
    ids = torch.ones(1, min(text_len, model.config.max_text_len), dtype=torch.long, device=device)
    out = {"image": _flops(model.image_features, pixels),
           "text": _flops(model.text_features, {"input_ids": ids})}
    model.train(was_training)
    out["total"] = out["image"] + out["text"]
    return out


def describe(preset: str | StudentConfig, embed_dim: int = 512, text_len: int = TEXT_LEN) -> dict:
    """Params and FLOPs of a preset (or config), built on the meta device so nothing is allocated."""
    config = preset if isinstance(preset, StudentConfig) else get_preset(preset, embed_dim)
    model = build_student(config, device="meta")
    return {
        "name": config.name,
        "image_size": config.image_size,
        "text_len": min(text_len, config.max_text_len) if config.text.kind == "hf" else config.max_text_len,
        "embed_dim": config.embed_dim,
        "params": count_params(model),
        "flops": flops_per_item(model, text_len),
    }


class _TeacherImage(nn.Module):
    def __init__(self, net: nn.Module, head: nn.Module):
        super().__init__()
        self.net, self.head = net, head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.net.extract_features(pixels).mean((2, 3)))


class _TeacherText(nn.Module):
    def __init__(self, net: nn.Module, head: nn.Module):
        super().__init__()
        self.net, self.head = net, head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(input_ids=input_ids).last_hidden_state.mean(1))


def lit_teacher_cost(embed_dim: int = 512, text_len: int = TEXT_LEN, image_size: int = 224) -> dict:
    """Params and FLOPs of the offline LiT teacher (EfficientNet-Lite0 + all-MiniLM-L6-v2 + linear heads).

    Counts what the teacher runs: Lite0's classifier and BERT's [CLS] pooler are unused and excluded.
    Architecture only (meta device), so no weights are read.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from efficientnet_lite_pytorch import EfficientNet
    from transformers import AutoConfig, AutoModel

    from pipeline.students.preprocess import resolve_tokenizer_dir

    with torch.device("meta"):
        lite = EfficientNet.from_name("efficientnet-lite0")
        lite._fc = nn.Identity()
        minilm = AutoModel.from_config(AutoConfig.from_pretrained(resolve_tokenizer_dir("minilm")))
        minilm.pooler = None
        image = _TeacherImage(lite, nn.Linear(1280, embed_dim)).eval()
        text = _TeacherText(minilm, nn.Linear(minilm.config.hidden_size, embed_dim)).eval()
        pixels = torch.zeros(1, 3, image_size, image_size)
        ids = torch.ones(1, text_len, dtype=torch.long)
    params = {"image": _numel(image), "text": _numel(text)}
    params["total"] = params["image"] + params["text"]
    flops = {"image": _flops(image, pixels), "text": _flops(text, ids)}
    flops["total"] = flops["image"] + flops["text"]
    return {"name": "lit-teacher", "image_size": image_size, "text_len": text_len, "embed_dim": embed_dim,
            "params": params, "flops": flops}
