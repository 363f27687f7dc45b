"""A student's text side taken from a trained dual encoder (this project's export, e.g. the strong teacher).

Weight inheritance (TinyCLIP, ``inherit_text_layers``): the student's text tower starts from chosen layers of the
source's fine-tuned text tower, and optionally from its projection, then trains. Both towers must be BERT-style
Hugging Face encoders of the same width; the student keeps its own depth (its ``num_layers``), and layer ``i`` of
the student becomes layer ``layers[i]`` of the source. The token table, positions and embedding LayerNorm come
from the source too. ``layers`` empty: evenly spaced, first and last kept.

The teacher's text side (NVIDIA's clip-distillation, ``with_text_side_of`` + ``keep_text_side``): the student's
text tower and projection *are* the source's, whole and frozen; only the image tower learns, into the source's
embedding space. The student's config and tokenizer become the source's on the text side, so its export carries
that text side and every stage-3 tool sees one complete dual encoder.
"""

from __future__ import annotations

import dataclasses

from pipeline.common.errors import PipelineError
from pipeline.students.config import StudentConfig
from pipeline.students.model import StudentModel
from pipeline.students.towers import HFTextTower


def spaced_layers(n_student: int, n_source: int) -> list[int]:
    """``n_student`` of ``n_source`` layer indices, evenly spaced, the first and (for n >= 2) the last included."""
    if n_student == 1:
        return [0]
    return [round(i * (n_source - 1) / (n_student - 1)) for i in range(n_student)]


def inherit_text_layers(student: StudentModel, source: StudentModel, layers: list[int] | tuple = (),
                        projection: bool = True) -> dict:
    """Copy the source's text embeddings, the chosen encoder layers and (``projection``) its text projection into
    ``student``; returns what was taken. One-line PipelineError when the towers cannot take each other's weights."""
    towers = (student.text_tower, source.text_tower)
    if not all(isinstance(t, HFTextTower) for t in towers):
        raise PipelineError("text weight inheritance needs Hugging Face (hf) text towers on both sides")
    mine, theirs = (t.model for t in towers)
    n_mine, n_theirs = len(mine.encoder.layer), len(theirs.encoder.layer)
    chosen = list(layers) or spaced_layers(n_mine, n_theirs)
    if len(chosen) != n_mine:
        raise PipelineError(f"inherit.text_layers names {len(chosen)} layers; the student's text tower has {n_mine}")
    if any(not 0 <= i < n_theirs for i in chosen):
        raise PipelineError(f"inherit.text_layers {chosen}: the source's text tower has layers 0-{n_theirs - 1}")
    try:
        mine.embeddings.load_state_dict(theirs.embeddings.state_dict())
        for i, j in enumerate(chosen):
            mine.encoder.layer[i].load_state_dict(theirs.encoder.layer[j].state_dict())
        if projection:
            student.text_proj.load_state_dict(source.text_proj.state_dict())
    except RuntimeError as exc:  # shape mismatch: another width, vocabulary or number of positions
        detail = " ".join(str(exc).split())[:240]
        raise PipelineError(f"the source's text tower does not fit the student's: {detail}") from None
    return {"layers": chosen, "of": n_theirs, "projection": projection}


def with_text_side_of(config: StudentConfig, source: StudentModel) -> StudentConfig:
    """``config`` with the source's text architecture (its resolved text spec: no weight files named) and
    caption length; build the student with ``tokenizer=source.tokenizer``."""
    if config.embed_dim != source.embed_dim:
        raise PipelineError(f"the teacher's text side projects to width {source.embed_dim}, the student to "
                            f"{config.embed_dim}")
    return dataclasses.replace(config, text=source.resolved_config.text, max_text_len=source.config.max_text_len,
                               freeze_text_embeddings=False, proj_bias=source.config.proj_bias)


def keep_text_side(student: StudentModel, source: StudentModel) -> int:
    """Copy the source's text tower and projection into ``student`` (built by ``with_text_side_of``) and freeze
    them; returns the number of frozen parameters."""
    try:
        student.text_tower.load_state_dict(source.text_tower.state_dict())
        student.text_proj.load_state_dict(source.text_proj.state_dict())
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:240]
        raise PipelineError(f"the teacher's text side does not fit the student: {detail}") from None
    frozen = 0
    for module in (student.text_tower, student.text_proj):
        for p in module.parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


__all__ = ["inherit_text_layers", "keep_text_side", "spaced_layers", "with_text_side_of"]
