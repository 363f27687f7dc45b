"""``ensemble:SPEC_A+SPEC_B[+...]``: several teachers cached and used as one.

Rule: the members' L2-normalised embeddings, each scaled by 1/sqrt(M), concatenated. The result is unit-norm,
and the cosine similarity of two ensemble embeddings is the mean of the members' cosine similarities, which is
what the similarity-based losses read (CD, SD and HND compare similarities; MobileCLIP averages its two
teachers' losses the same way). Averaging the vectors instead would add up coordinates of embedding spaces that
were never aligned with each other, and needs equal widths; concatenation takes members of any widths. The
width is the sum of the members' widths (students project to it); FD then matches each member's embedding in
its own block.

The cache records the ensemble's fingerprint (over every member's fingerprint and the rule) and, as the
teacher name, every member's fingerprint.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.common.errors import PipelineError
from pipeline.teachers.base import Teacher, to_device

RULE = "concat-unit-over-sqrt-m"
SEPARATOR = "+"


class EnsembleTransform:
    """One image -> each member's preprocessed tensor, keyed ``m0``, ``m1``, ... (picklable for workers)."""

    def __init__(self, transforms: list[Callable[[Image.Image], torch.Tensor]]):
        self.transforms = transforms

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return {f"m{i}": t(image) for i, t in enumerate(self.transforms)}


class EnsembleTeacher(Teacher):
    def __init__(self, members: list[Teacher]):
        if len(members) < 2:
            raise PipelineError("an ensemble needs at least two teachers: ensemble:SPEC_A+SPEC_B")
        self.members = members
        self.width = sum(m.width for m in members)
        self.name = "ensemble[" + ",".join(m.fingerprint() for m in members) + "]"
        self.device = members[0].device

    @classmethod
    def from_spec(cls, arg: str) -> "EnsembleTeacher":
        from pipeline.teachers import load_teacher, parse_spec

        specs = [s.strip() for s in arg.split(SEPARATOR) if s.strip()]
        if len(specs) < 2:
            raise PipelineError(f"ensemble:{arg}: name two or more teacher specs joined by '+', e.g. "
                                "ensemble:dual:a.pt+lit:b.pt")
        if any(parse_spec(s).kind == "ensemble" for s in specs):
            raise PipelineError(f"ensemble:{arg}: an ensemble cannot contain another ensemble; list its members")
        return cls([load_teacher(s) for s in specs])

    def to(self, device: str | torch.device) -> "EnsembleTeacher":
        self.device = torch.device(device)
        for m in self.members:
            m.to(self.device)
        return self

    def modules(self) -> list[torch.nn.Module]:
        return [mod for m in self.members for mod in m.modules()]

    def image_transform(self) -> EnsembleTransform:
        return EnsembleTransform([m.image_transform() for m in self.members])

    def tokenize(self, texts: list[str]) -> dict[str, Any]:
        return {f"m{i}": m.tokenize(texts) for i, m in enumerate(self.members)}

    def _combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        scale = 1.0 / math.sqrt(len(parts))
        return torch.cat([F.normalize(p.float(), dim=-1) * scale for p in parts], dim=-1)

    def _encode_images(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._combine([m._encode_images(to_device(pixels[f"m{i}"], m.device))
                              for i, m in enumerate(self.members)])

    def _encode_texts(self, tokens: dict[str, Any]) -> torch.Tensor:
        return self._combine([m._encode_texts(to_device(tokens[f"m{i}"], m.device))
                              for i, m in enumerate(self.members)])

    def fingerprint_parts(self) -> dict:
        return {"rule": RULE, "members": [m.fingerprint() for m in self.members]}
