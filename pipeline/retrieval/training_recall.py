"""Validation during training: a student's Recall@K on a split, with the stage-3 metric (exact search)."""

from __future__ import annotations

from pipeline.data.manifest import Manifest
from pipeline.features.encode import embed_manifest
from pipeline.retrieval.metrics import recall_at_k
from pipeline.students import StudentEncoder


def student_recall(model, manifest: Manifest, batch_size: int) -> dict:
    """Student Recall@1/5/10 both ways + RSUM on a split; the model's train mode and grad flags are kept."""
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    encoder = StudentEncoder(model)  # switches to eval mode; train mode and grad flags are restored below
    emb = embed_manifest(encoder, manifest, batch_size=batch_size, workers=0)
    for p in trainable:
        p.requires_grad_(True)
    model.train(was_training)
    return recall_at_k(emb.image_emb, emb.text_emb, emb.text_image_idx)
