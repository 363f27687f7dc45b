"""Start points for domain adaptation (method.md section 3): a pretrained dual encoder as a trainable
``StudentModel``, so the adapted model is written by ``export_student`` and evaluated by stage 3 as is.

Specs (``load_start``):
    student:PATH | PATH              a student export (``runs/<name>/export/student.pt``) or its run folder
    lit[:CHECKPOINT]                 the offline LiT teacher, rebuilt as the same function with student towers
    openclip:ARCH[/TAG|/CHECKPOINT]  an open_clip CLIP model (a tag downloads its weights)

Teachers become students through ``pipeline.students.from_teacher`` (the same function, student towers).

Hugging Face CLIP/SigLIP (``hf:``) start points are refused: the student export format has no tower kind
for them, so the adapted model could not be evaluated by stage 3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.common import paths
from pipeline.common.errors import PipelineError
from pipeline.teachers import parse_spec
from pipeline.students import StudentModel, load_student_model
from pipeline.students.from_teacher import teacher_as_student

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
        if teacher.kind not in ("lit", "openclip"):
            raise PipelineError(
                "hf: start points are not supported: student exports have no Hugging Face CLIP/SigLIP tower "
                "kind, so the adapted model could not be evaluated; use an openclip: or student: start point")
        model, fingerprint = teacher_as_student(spec)
        # The fingerprint of the teacher a LiT start is: stage 3 compares it with the cache's.
        start = StartPoint(model, spec, teacher.kind,
                           {"teacher_fingerprint": fingerprint()} if teacher.kind == "lit" else {})
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


__all__ = ["StartPoint", "load_start", "set_trainable", "frozen_towers", "TRAINABLE"]
