"""Teacher backends behind one interface (``Teacher``) and a spec-string loader.

Specs:
    lit[:CHECKPOINT]                 offline default: frozen EfficientNet-Lite + MiniLM + trained heads
    openclip:ARCH[/PRETRAINED_TAG]   open_clip model; PRETRAINED_TAG may be a local checkpoint path
    hf:NAME_OR_DIR                   Hugging Face CLIP / SigLIP model from the hub or a local directory
"""

from __future__ import annotations

from pipeline.common.errors import PipelineError
from pipeline.teachers.base import Teacher

DEFAULT_LIT_CHECKPOINT = "artifacts/teachers/lit-openmoji.pt"


def load_teacher(spec: str, device: str = "cpu") -> Teacher:
    """Build a teacher from a spec string (see module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "lit":
        from pipeline.teachers.lit import LitTeacher

        teacher = LitTeacher.load(arg or DEFAULT_LIT_CHECKPOINT)
    elif kind == "openclip":
        from pipeline.teachers.openclip import OpenClipTeacher

        arch, _, pretrained = arg.partition("/")
        if not arch:
            raise PipelineError("openclip teacher needs an architecture, e.g. openclip:ViT-B-32/laion2b_s34b_b79k")
        teacher = OpenClipTeacher(arch, pretrained or None)
    elif kind == "hf":
        from pipeline.teachers.hf import HFTeacher

        if not arg:
            raise PipelineError("hf teacher needs a model name or directory, e.g. hf:openai/clip-vit-base-patch32")
        teacher = HFTeacher(arg)
    else:
        raise PipelineError(f"unknown teacher spec {spec!r}: expected lit[:ckpt], openclip:ARCH[/TAG] or hf:NAME")
    return teacher.to(device)


__all__ = ["Teacher", "load_teacher", "DEFAULT_LIT_CHECKPOINT"]
