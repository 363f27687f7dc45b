"""Step-1 inputs of the classification stage (method.md 4): the token cache and the class-prompt embeddings.

The token cache is a stage-1 job (``pipeline.features.tokens``: reader, mapper, writer); its image tokens are an
optional capability of the teacher backend (``Teacher.image_tokens``: lit -> EfficientNet-Lite0's 7x7 map as 49
tokens, open_clip ViT -> patch tokens after ``ln_post``, hf CLIP/SigLIP -> patch tokens, ``dual:`` -> a timm
tower's feature map or output tokens); a backend without them is refused in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.classify.store import prompts_path, write_prompts
from pipeline.common.errors import PipelineError
from pipeline.features.encode import encode_captions
from pipeline.features.tokens import TokenSummary, run_token_job
from pipeline.teachers.base import Teacher

# pixels -> (tokens (B, T, C), pooled (B, P), L2-normalised embedding (B, D)), all float32
Extract = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

cache_split_tokens = run_token_job  # the name teacher-tokens and the tests use


def token_extractor(teacher: Teacher) -> tuple[Extract, dict]:
    """(the teacher's ``image_tokens``, its image architecture for a fresh student); refused in one line for a
    backend without image tokens."""
    return teacher.image_tokens, teacher.token_arch()


def check_templates(templates: list[str]) -> list[str]:
    if not templates:
        raise PipelineError("give at least one class-prompt template, e.g. 'a photo of a {label}.'")
    for t in templates:
        if "{label}" not in t:
            raise PipelineError(f"prompt template {t!r} has no {{label}} placeholder")
    return list(templates)


def cache_prompts(teacher: Teacher, classes: list[str], templates: list[str], out_dir: str | Path) -> Path:
    """(K, D) class-prompt embeddings: each template's embedding, averaged over templates, re-normalised."""
    templates = check_templates(templates)
    path = prompts_path(Path(out_dir), classes, templates)
    if path.exists():
        return path
    per_template = [encode_captions(teacher, [t.format(label=c) for c in classes]) for t in templates]
    emb = F.normalize(torch.from_numpy(np.mean(per_template, axis=0)), dim=-1).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_prompts(path, emb, classes, templates, teacher.fingerprint())


__all__ = ["token_extractor", "cache_split_tokens", "cache_prompts", "check_templates", "TokenSummary"]
