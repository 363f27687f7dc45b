"""Weight inheritance (TinyCLIP): a student's text tower starts from chosen layers of a trained dual encoder's own
fine-tuned text tower (this project's export, e.g. the strong teacher), and optionally from its projection.

Both towers must be BERT-style Hugging Face encoders of the same width; the student keeps its own depth (its
``num_layers``), and layer ``i`` of the student becomes layer ``layers[i]`` of the source. The token table,
positions and embedding LayerNorm come from the source too. ``layers`` empty: evenly spaced, first and last kept.
"""

from __future__ import annotations

from pipeline.common.errors import PipelineError
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


__all__ = ["inherit_text_layers", "spaced_layers"]
