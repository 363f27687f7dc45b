"""Teacher backends behind one interface (``Teacher``) and a spec-string loader.

Specs:
    lit[:CHECKPOINT]                 offline default: frozen EfficientNet-Lite + MiniLM + trained heads
    openclip:ARCH[/PRETRAINED_TAG]   open_clip model; PRETRAINED_TAG may be a local checkpoint path
    hf:NAME_OR_DIR                   Hugging Face CLIP / SigLIP model from the hub or a local directory
    dual:EXPORT                      a dual encoder trained by this project (a student export), e.g. the strong
                                     emoji teacher `make teacher` fine-tunes: artifacts/teachers/emoji-strong.pt
    ensemble:SPEC_A+SPEC_B[+...]     several teachers as one (their unit embeddings concatenated / sqrt(M);
                                     pipeline.teachers.ensemble says why)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pipeline.common.errors import PipelineError
from pipeline.teachers.base import Teacher

DEFAULT_LIT_CHECKPOINT = "artifacts/teachers/lit-openmoji.pt"


# Spec kind -> the backend class ("module:Class"); each class parses its own argument (``from_spec``).
# A new backend is one module with a Teacher subclass plus one line here.
BACKENDS = {
    "lit": "pipeline.teachers.lit:LitTeacher",
    "openclip": "pipeline.teachers.openclip:OpenClipTeacher",
    "hf": "pipeline.teachers.hf:HFTeacher",
    "dual": "pipeline.students.export:DualEncoderTeacher",
    "ensemble": "pipeline.teachers.ensemble:EnsembleTeacher",
}


@dataclass(frozen=True)
class TeacherSpec:
    kind: str  # a key of BACKENDS
    arg: str  # everything after "kind:" (may be empty)


def parse_spec(spec: str) -> TeacherSpec:
    """The one parser of teacher specs (module docstring); every command that takes a teacher uses it."""
    kind, _, arg = spec.partition(":")
    if kind not in BACKENDS:
        raise PipelineError(f"unknown teacher spec {spec!r}: expected lit[:ckpt], openclip:ARCH[/TAG], "
                            "hf:NAME, dual:EXPORT or ensemble:SPEC+SPEC")
    return TeacherSpec(kind, arg)


def backend(kind: str) -> type:
    module, _, cls = BACKENDS[kind].partition(":")
    return getattr(importlib.import_module(module), cls)


def load_teacher(spec: str, device: str = "cpu") -> Teacher:
    """Build a teacher from a spec string (see module docstring)."""
    s = parse_spec(spec)
    return backend(s.kind).from_spec(s.arg).to(device)


__all__ = ["Teacher", "TeacherSpec", "BACKENDS", "backend", "load_teacher", "parse_spec", "DEFAULT_LIT_CHECKPOINT"]
