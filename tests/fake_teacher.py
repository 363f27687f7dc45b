"""A deterministic, dependency-free teacher for cache tests (no model weights needed)."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from pipeline.teachers.base import Teacher


class _ToTensor:
    """Picklable transform: 8x8 RGB thumbnail as a CHW float tensor."""

    def __call__(self, img):
        arr = np.asarray(img.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class FakeTeacher(Teacher):
    """Image embedding = fixed random projection of an 8x8 thumbnail; text = projection of char counts."""

    name = "fake"

    def __init__(self, width: int = 16, seed: int = 0, fail_after_batches: int | None = None):
        self.width = width
        g = torch.Generator().manual_seed(seed)
        self.img_proj = torch.randn(3 * 8 * 8, width, generator=g)
        self.txt_proj = torch.randn(64, width, generator=g)
        self.seed = seed
        self.fail_after_batches = fail_after_batches
        self.image_batches = 0

    def image_transform(self):
        return _ToTensor()

    def tokenize(self, texts):
        counts = torch.zeros(len(texts), 64)
        for i, t in enumerate(texts):
            for ch in t:
                counts[i, zlib.crc32(ch.encode()) % 64] += 1
        return counts

    def _encode_images(self, pixels):
        self.image_batches += 1
        if self.fail_after_batches is not None and self.image_batches > self.fail_after_batches:
            raise KeyboardInterrupt("simulated kill")
        return pixels.flatten(1) @ self.img_proj + 1e-3

    def _encode_texts(self, tokens):
        return tokens @ self.txt_proj + 1e-3

    def fingerprint_parts(self):
        return {"seed": self.seed}
