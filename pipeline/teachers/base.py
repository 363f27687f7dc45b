"""The one small interface every teacher (and every exported student) implements.

A teacher maps PIL images and caption strings to L2-normalised embeddings of one width.
Preprocessing (``image_transform``) runs in DataLoader workers; ``encode_*`` run on the device.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.common.errors import PipelineError


@dataclass
class KnownEmbeddings:
    """Embeddings a teacher already holds for some images (by image_id) and captions (by text).

    Rows are L2-normalised, with the norms they had before normalising (as ``encode_*_with_norms``).
    """

    image_ids: np.ndarray  # (N,) int64
    image_unit: np.ndarray  # (N, D) float32
    image_norm: np.ndarray  # (N,) float32
    captions: list[str]  # (M,)
    text_unit: np.ndarray  # (M, D)
    text_norm: np.ndarray  # (M,)

    def image_lookup(self) -> dict[int, int]:
        return {int(i): r for r, i in enumerate(self.image_ids.tolist())}

    def caption_lookup(self) -> dict[str, int]:
        return {c: r for r, c in enumerate(self.captions)}


class Teacher(ABC):
    """Frozen image-text encoder pair used to produce cached targets."""

    #: short name used in cache paths, e.g. ``lit`` or ``openclip-ViT-L-14``
    name: str
    #: embedding width D shared by both modalities
    width: int

    @abstractmethod
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL RGB image -> CHW float tensor; picklable so DataLoader workers can run it."""

    def tensor_preprocess(self):
        """``image_transform`` as tensor ops (``teachers.preprocess.TensorPreprocess``), so stage 1 can decode
        and preprocess on the GPU; None when it has no such form (stage 1 then preprocesses in CPU workers)."""
        return None

    @abstractmethod
    def tokenize(self, texts: list[str]) -> Any:
        """Captions -> model inputs (a tensor or a dict of tensors), batched."""

    @abstractmethod
    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings (B, D)."""

    @abstractmethod
    def _encode_texts(self, tokens: Any) -> torch.Tensor:
        """Unnormalised text embeddings (B, D)."""

    @abstractmethod
    def fingerprint_parts(self) -> dict:
        """Everything that determines the embeddings (weights digest, preprocessing, ...)."""

    device: torch.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> "Teacher":
        self.device = torch.device(device)
        for m in self.modules():
            m.to(self.device)
        return self

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules that must move with ``to``; subclasses list theirs."""
        return []

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_images_with_norms(pixels)[0]

    @torch.no_grad()
    def encode_texts(self, tokens: Any) -> torch.Tensor:
        return self.encode_texts_with_norms(tokens)[0]

    @torch.no_grad()
    def encode_images_with_norms(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2-normalised embeddings (B, D), their norms before normalising (B,))."""
        return split_norm(self._encode_images(to_device(pixels, self.device)))  # a tensor, or a dict (ensembles)

    @torch.no_grad()
    def encode_texts_with_norms(self, tokens: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return split_norm(self._encode_texts(to_device(tokens, self.device)))

    def image_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Optional capability (classification token cache, method.md 4): preprocessed pixels -> (image tokens
        (B, T, C), the pooled feature a text-free probe reads (B, P), the L2-normalised embedding (B, D)), all
        float32. Backends that have tokens override this and ``token_arch``; the others refuse in one line."""
        raise PipelineError(self._no_tokens())

    def token_arch(self) -> dict:
        """The image architecture behind ``image_tokens`` ({"kind", "name", "kwargs"}), for a fresh student of
        the same kind; refused like ``image_tokens`` (call it first to fail before any image is read)."""
        raise PipelineError(self._no_tokens())

    def _no_tokens(self) -> str:
        return (f"teacher {self.name} ({type(self).__name__}) has no image tokens; token features need a lit, "
                "open_clip ViT, hf or dual: (timm image tower) teacher")

    def known_embeddings(self, manifest) -> KnownEmbeddings | None:
        """Embeddings of ``manifest``'s images/captions this teacher computed before (e.g. while it was
        trained), so stage 1 need not encode them again; None when it has none."""
        return None

    def fingerprint(self) -> str:
        """Short digest that changes whenever weights or preprocessing change."""
        blob = json.dumps({"name": self.name, "width": self.width, **self.fingerprint_parts()}, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def split_norm(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    raw = raw.float()
    return F.normalize(raw, dim=-1), raw.norm(dim=-1)


def to_device(tokens: Any, device: torch.device) -> Any:
    if isinstance(tokens, torch.Tensor):
        return tokens.to(device, non_blocking=True)
    if isinstance(tokens, dict):
        return {k: to_device(v, device) for k, v in tokens.items()}
    return tokens


def state_dict_digest(*modules: torch.nn.Module) -> str:
    """sha256 over parameters and buffers in key order: identifies weights regardless of file path."""
    h = hashlib.sha256()
    for m in modules:
        for key, t in sorted(m.state_dict().items()):
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
