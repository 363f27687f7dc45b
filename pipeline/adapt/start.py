"""Start points for domain adaptation (method.md section 3): a pretrained dual encoder as a trainable
``StudentModel``, so the adapted model is written by ``export_student`` and evaluated by stage 3 as is.

Specs (``load_start``):
    student:PATH | PATH              a student export (``runs/<name>/export/student.pt``) or its run folder
    lit[:CHECKPOINT]                 the offline LiT teacher, rebuilt as the same function with student towers
    openclip:ARCH[/TAG|/CHECKPOINT]  an open_clip CLIP model (a tag downloads its weights)

The LiT teacher becomes EfficientNet-Lite0 (timm, packaged ImageNet weights) + all 6 MiniLM layers with its
heads folded into the projections (a head is ``W ((x - mean) / scale) + b``, an affine map), and its
preprocessing as transform settings, so the converted model embeds exactly like the teacher. An open_clip
model keeps its own towers (each ends in CLIP's projection) with identity student projections.

Hugging Face CLIP/SigLIP (``hf:``) start points are refused: the student export format has no tower kind
for them, so the adapted model could not be evaluated by stage 3.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.common import paths
from pipeline.common.errors import PipelineError
from pipeline.teachers import parse_spec
from pipeline.students import (
    MINILM, ImageTowerSpec, StudentConfig, StudentModel, TextTowerSpec, TransformSettings, build_student,
    load_student_model,
)

TRAINABLE = ("all", "projections", "text")  # what set_trainable may leave trainable


@dataclass
class StartPoint:
    """A trainable start model and what an export of its adapted copy should record."""

    model: StudentModel
    spec: str
    kind: str  # student | lit | openclip
    meta: dict = field(default_factory=dict)  # teacher_fingerprint, dataset (for stage 3's cache checks)


def load_start(spec: str, device: str | torch.device = "cpu") -> StartPoint:
    """Build the start model named by ``spec`` (module docstring); it is returned in train mode."""
    kind, _, arg = spec.partition(":")
    if kind == "student":
        start = _from_student(arg, spec)
    elif kind not in ("lit", "openclip", "hf") and Path(spec).exists():
        start = _from_student(spec, spec)
    else:
        try:
            teacher = parse_spec(spec)  # the teachers' own spec parser
        except PipelineError as exc:
            raise PipelineError(f"unknown start point {spec!r}: expected student:PATH (or the path of a student "
                                f"export) or a teacher spec ({exc})") from None
        if teacher.kind == "lit":
            start = _from_lit(teacher.arg or None, spec)
        elif teacher.kind == "openclip":
            from pipeline.teachers.openclip import split_arg

            start = StartPoint(openclip_student(*split_arg(teacher.arg)), spec, "openclip")
        else:
            raise PipelineError(
                "hf: start points are not supported: student exports have no Hugging Face CLIP/SigLIP tower "
                "kind, so the adapted model could not be evaluated; use an openclip: or student: start point")
    start.model.to(device).train()
    return start


def _from_student(path: str, spec: str) -> StartPoint:
    p = Path(path)
    if p.is_dir():  # a run folder
        p = paths.student_export(p)
    model, meta = load_student_model(p)
    # The export's config froze what its training froze (e.g. the token table); everything else trains.
    for param in model.parameters():
        param.requires_grad_(True)
    if model.config.freeze_text_embeddings:
        model.text_tower.token_embedding().requires_grad_(False)
    keep = {k: meta[k] for k in ("teacher_fingerprint", "dataset") if meta.get(k) is not None}
    return StartPoint(model, spec, "student", {**keep, "start_run": meta.get("run")})


# ---- the LiT teacher as a student ---------------------------------------------------------------------


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
    from pipeline.teachers import lit

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


def _from_lit(checkpoint: str | None, spec: str) -> StartPoint:
    from pipeline.teachers import DEFAULT_LIT_CHECKPOINT
    from pipeline.teachers.lit import LitTeacher, load_heads

    heads, _ = load_heads(checkpoint or DEFAULT_LIT_CHECKPOINT)
    model = lit_student(heads)
    # The fingerprint of the teacher this model starts as: stage 3 compares it with the cache's.
    fingerprint = LitTeacher(heads, towers=_NoTowers()).fingerprint()
    return StartPoint(model, spec, "lit", {"teacher_fingerprint": fingerprint})


class _NoTowers:
    """Stand-in towers for computing a LiT fingerprint (it depends on the heads and package versions only)."""

    def to(self, device):
        return self

    def modules(self) -> list[nn.Module]:
        return []


# ---- open_clip ----------------------------------------------------------------------------------------


def openclip_student(arch: str, pretrained: str | None = None) -> StudentModel:
    """An open_clip model as a student; ``pretrained``: a tag, a checkpoint file or None (random weights)."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise PipelineError(f"unknown open_clip architecture {arch!r} (see open_clip.list_models())")
    weights, tag_cfg = pretrained, {}
    if pretrained and not Path(pretrained).is_file():
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
        if not tag_cfg:
            raise PipelineError(
                f"{pretrained!r} is neither a checkpoint file nor a pretrained tag of {arch!r}")
        weights = open_clip.download_pretrained(tag_cfg)  # needs the network (the hub)
        if tag_cfg.get("quick_gelu"):
            cfg = {**cfg, "quick_gelu": True}
    text_cfg = cfg["text_cfg"]
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise PipelineError(f"open_clip {arch!r} uses a Hugging Face text model: not supported as a start")
    over = {"quick_gelu": cfg.get("quick_gelu", False)}
    config = StudentConfig(
        name=f"openclip-{arch}",
        image=ImageTowerSpec(kind="open_clip", name=arch, kwargs=over, weights=weights),
        text=TextTowerSpec(kind="open_clip", name=arch, config=over, pretrained=weights, tokenizer=None),
        embed_dim=int(cfg["embed_dim"]), image_size=_image_size(cfg["vision_cfg"]),
        max_text_len=int(text_cfg.get("context_length", 77)), channels_last=False,
    )
    model = build_student(config)
    with torch.no_grad():  # the towers end in CLIP's projections already
        for proj in (model.image_proj, model.text_proj):
            proj.weight.copy_(torch.eye(config.embed_dim))
    if tag_cfg.get("mean") and tag_cfg.get("std"):  # a tag's own normalisation wins over the config's
        model.transform_settings = dataclasses.replace(
            model.transform_settings, mean=tuple(tag_cfg["mean"]), std=tuple(tag_cfg["std"]),
            interpolation=tag_cfg.get("interpolation", model.transform_settings.interpolation))
    return model


def _image_size(vision_cfg: dict) -> int:
    size = vision_cfg.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise PipelineError(f"non-square open_clip image size {size} is not supported")
        size = size[0]
    return int(size)


# ---- what trains --------------------------------------------------------------------------------------


def set_trainable(model: StudentModel, what: str) -> dict[str, int]:
    """Freeze all but ``what`` (``all``: everything the start left trainable; ``projections``: the two
    linear heads, LiT's recipe; ``text``: text tower + heads). Returns parameter counts."""
    if what not in TRAINABLE:
        raise PipelineError(f"trainable must be one of {TRAINABLE}, not {what!r}")
    if what != "all":
        keep = {"projections": (model.image_proj, model.text_proj),
                "text": (model.image_proj, model.text_proj, model.text_tower)}[what]
        kept = {id(p) for m in keep for p in m.parameters() if p.requires_grad}
        for p in model.parameters():
            p.requires_grad_(id(p) in kept)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def frozen_towers(model: StudentModel) -> list[nn.Module]:
    """Towers with no trainable parameter: kept in eval mode while training (batch-norm statistics fixed)."""
    towers = (model.image_tower, model.text_tower)
    return [t for t in towers if not any(p.requires_grad for p in t.parameters())]


__all__ = ["StartPoint", "load_start", "lit_config", "lit_student", "openclip_student", "set_trainable",
           "frozen_towers", "TRAINABLE"]
