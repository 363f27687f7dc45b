"""Teachers rebuilt as ``StudentModel``s that embed exactly like them, so a student can start from one (adaptation,
method.md section 3) or keep its text side (``teacher_text``, issue 36.2) and still be written by ``export_student``
and read by stage 3 like any student.

    dual:EXPORT         already a student export: its model as is
    lit[:CHECKPOINT]    EfficientNet-Lite0 (timm, packaged ImageNet weights) + all 6 MiniLM layers with the LiT heads
                        folded into the projections (a head is ``W ((x - mean) / scale) + b``, an affine map), and its
                        preprocessing as transform settings
    openclip:ARCH[/...] the open_clip model's own towers (each ends in CLIP's projection) with identity projections

Hugging Face CLIP/SigLIP (``hf:``) and ensembles are refused: the student export format has no tower kind for them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from pipeline.common.errors import PipelineError
from pipeline.students.config import MINILM, ImageTowerSpec, StudentConfig, TextTowerSpec
from pipeline.students.model import StudentModel, build_student
from pipeline.students.preprocess import TransformSettings

REBUILDABLE = ("dual", "lit", "openclip")  # teacher kinds ``teacher_as_student`` can rebuild


def teacher_as_student(spec: str) -> tuple[StudentModel, Callable[[], str]]:
    """(the teacher named by ``spec`` as a student model, a function giving its teacher fingerprint: the one its
    stage-1 caches record; a function because hashing a large model's weights takes seconds)."""
    from pipeline.teachers import DEFAULT_LIT_CHECKPOINT, parse_spec

    s = parse_spec(spec)
    if s.kind == "dual":
        from pipeline.students.export import DualEncoderTeacher

        dual = DualEncoderTeacher.from_spec(s.arg)
        return dual.model, dual.fingerprint
    if s.kind == "lit":
        from pipeline.teachers.lit import LitTeacher, load_heads

        heads, _ = load_heads(s.arg or DEFAULT_LIT_CHECKPOINT)
        # A LiT fingerprint depends on the heads and package versions only: no towers needed to compute it.
        return lit_student(heads), LitTeacher(heads, towers=_NoTowers()).fingerprint
    if s.kind == "openclip":
        from pipeline.teachers.openclip import OpenClipTeacher

        teacher = OpenClipTeacher.from_spec(s.arg)
        return openclip_as_student(teacher), teacher.fingerprint
    raise PipelineError(f"a {s.kind}: teacher cannot be rebuilt as a student dual encoder (the export format has no "
                        f"tower kind for it); use one of: {', '.join(k + ':' for k in REBUILDABLE)}")


# ---- the LiT teacher ----------------------------------------------------------------------------------


def lit_config(width: int, image_size: int | None = None) -> StudentConfig:
    """The LiT teacher's towers as a student config (see ``pipeline.teachers.lit`` for the teacher)."""
    from pipeline.teachers import lit

    return StudentConfig(
        name="lit",
        image=ImageTowerSpec(kind="timm", name="tf_efficientnet_lite0", weights=lit.IMAGE_MODEL),
        text=TextTowerSpec(kind="hf", pretrained=MINILM, tokenizer=MINILM),
        embed_dim=width, image_size=image_size or lit.IMAGE_SIZE, max_text_len=lit.MAX_TOKENS, proj_bias=True,
    )


def lit_student(heads) -> StudentModel:
    """A ``StudentModel`` computing what ``LitTeacher(heads)`` computes (``heads``: a ``LitHeads``)."""
    model = build_student(lit_config(heads.width, heads.image_size))
    for proj, head in ((model.image_proj, heads.image), (model.text_proj, heads.text)):
        # W ((x - mean) / scale) + b  ==  (W / scale) x + (b - W mean / scale)
        w = head.proj.weight.detach() / head.scale
        with torch.no_grad():
            proj.weight.copy_(w)
            proj.bias.copy_(head.proj.bias.detach() - w @ head.mean)
    # LitImageTransform: shorter side to the heads' size (bicubic), centre crop, (uint8 - 127) / 128.
    model.transform_settings = TransformSettings(
        size=heads.image_size, mean=(127 / 255,) * 3, std=(128 / 255,) * 3, interpolation="bicubic",
        crop_pct=1.0, train_scale=model.transform_settings.train_scale, hflip=model.transform_settings.hflip)
    return model


class _NoTowers:
    """Stand-in towers for computing a LiT fingerprint (it depends on the heads and package versions only)."""

    def to(self, device):
        return self

    def modules(self) -> list[nn.Module]:
        return []


# ---- open_clip ----------------------------------------------------------------------------------------


def openclip_as_student(teacher) -> StudentModel:
    """An ``OpenClipTeacher``'s model as a student: the same towers and weights, identity projections, its
    normalisation. Refused (one line) for open_clip models with a Hugging Face text tower."""
    cfg = teacher.model_cfg
    if cfg["text_cfg"].get("hf_model_name") or cfg["text_cfg"].get("hf_tokenizer_name"):
        raise PipelineError(f"open_clip {teacher.arch!r} uses a Hugging Face text model: it cannot be rebuilt as a "
                            "student (the export format has no tower kind for it)")
    keep = {k: cfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu") if k in cfg}
    config = StudentConfig(
        name=f"openclip-{teacher.arch}",
        image=ImageTowerSpec(kind="open_clip", name="", kwargs=keep),
        text=TextTowerSpec(kind="open_clip", name="", config=keep, tokenizer=None),
        embed_dim=int(cfg["embed_dim"]), image_size=_image_size(cfg["vision_cfg"]),
        max_text_len=int(cfg["text_cfg"].get("context_length", 77)), channels_last=False,
    )
    model = build_student(config, load_weights=False)
    state = teacher.model.state_dict()
    text_prefix = "text." if any(k.startswith("text.") for k in state) else ""  # CustomTextCLIP keeps it apart
    try:
        model.image_tower.load_state_dict(_under(state, "visual."))
        model.text_tower.tower.load_state_dict(
            _under(state, text_prefix, drop=("visual.", "logit_scale", "logit_bias")), strict=True)
    except RuntimeError as exc:
        raise PipelineError(f"open_clip {teacher.arch!r} does not fit its student rebuild: "
                            f"{' '.join(str(exc).split())[:240]}") from None
    with torch.no_grad():  # the towers end in CLIP's projections already
        for proj in (model.image_proj, model.text_proj):
            proj.weight.copy_(torch.eye(config.embed_dim))
            if proj.bias is not None:
                proj.bias.zero_()
    pre = teacher.preprocess_cfg  # the weights' own normalisation (a pretrained tag's wins over the config's)
    model.transform_settings = dataclasses.replace(
        model.transform_settings, mean=tuple(pre.get("mean", model.transform_settings.mean)),
        std=tuple(pre.get("std", model.transform_settings.std)),
        interpolation=pre.get("interpolation", model.transform_settings.interpolation))
    return model


def _under(state: dict, prefix: str, drop: tuple[str, ...] = ()) -> dict:
    """The entries of ``state`` under ``prefix`` (the prefix removed), minus keys starting with ``drop``."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(drop)}


def _image_size(vision_cfg: dict) -> int:
    size = vision_cfg.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise PipelineError(f"non-square open_clip image size {size} is not supported")
        size = size[0]
    return int(size)


__all__ = ["REBUILDABLE", "lit_config", "lit_student", "openclip_as_student", "teacher_as_student"]
