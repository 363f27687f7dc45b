"""Teacher backends behind one interface (``Teacher``) and a spec-string loader.

Specs:
    lit[:CHECKPOINT]                 offline default: frozen EfficientNet-Lite + MiniLM + trained heads
    openclip:ARCH[/PRETRAINED_TAG]   open_clip model; PRETRAINED_TAG may be a local checkpoint path
    hf:NAME_OR_DIR                   Hugging Face CLIP / SigLIP model from the hub or a local directory
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.common.errors import PipelineError
from pipeline.teachers.base import Teacher

DEFAULT_LIT_CHECKPOINT = "artifacts/teachers/lit-openmoji.pt"


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed teacher spec: ``kind`` (lit | openclip | hf), its main argument and, for open_clip, the tag."""

    kind: str
    arg: str | None
    tag: str | None = None


def parse_spec(spec: str) -> TeacherSpec:
    """The one parser of teacher specs (module docstring); every command that takes a teacher uses it."""
    kind, _, arg = spec.partition(":")
    if kind == "lit":
        return TeacherSpec("lit", arg or DEFAULT_LIT_CHECKPOINT)
    if kind == "openclip":
        arch, _, tag = arg.partition("/")
        if not arch:
            raise PipelineError("openclip teacher needs an architecture, e.g. openclip:ViT-B-32/laion2b_s34b_b79k")
        return TeacherSpec("openclip", arch, tag or None)
    if kind == "hf":
        if not arg:
            raise PipelineError("hf teacher needs a model name or directory, e.g. hf:openai/clip-vit-base-patch32")
        return TeacherSpec("hf", arg)
    raise PipelineError(f"unknown teacher spec {spec!r}: expected lit[:ckpt], openclip:ARCH[/TAG] or hf:NAME")


def load_teacher(spec: str, device: str = "cpu") -> Teacher:
    """Build a teacher from a spec string (see module docstring)."""
    s = parse_spec(spec)
    if s.kind == "lit":
        from pipeline.teachers.lit import LitTeacher

        teacher = LitTeacher.load(s.arg)
    elif s.kind == "openclip":
        from pipeline.teachers.openclip import OpenClipTeacher

        teacher = OpenClipTeacher(s.arg, s.tag)
    else:
        from pipeline.teachers.hf import HFTeacher

        teacher = HFTeacher(s.arg)
    return teacher.to(device)


__all__ = ["Teacher", "TeacherSpec", "load_teacher", "parse_spec", "DEFAULT_LIT_CHECKPOINT"]
