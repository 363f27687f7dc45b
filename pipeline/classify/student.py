"""Step 2 students: a freshly initialised image encoder of the teacher's architecture + a linear classifier.

The architecture comes from the token cache (recorded by teacher-tokens): ``lit`` -> timm's
``tf_efficientnet_lite0`` (layer for layer the packaged EfficientNet-Lite0), open_clip ViT -> the same
vision config, Hugging Face -> the same vision config. ``distill.arch`` can name another one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.common.errors import PipelineError
from pipeline.common.precision import autocast
from pipeline.data.images import ImageDecodeError, load_rgb
from pipeline.data.loader import iter_image_batches, seeded_augmentation, worker_start_method
from pipeline.train.state import atomic_save, load_checkpoint
from pipeline.students.config import ImageTowerSpec
from pipeline.students.preprocess import ImageTransform, TransformSettings
from pipeline.students.towers import build_image_tower

EXPORT_FORMAT = "clipdistill-classifier/1"


class _HFVision(nn.Module):
    """A Hugging Face vision model (random init from its config) -> pooled output."""

    def __init__(self, config: dict):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        config = dict(config)
        model_type = config.pop("model_type")
        self.model = AutoModel.from_config(AutoConfig.for_model(model_type, **config))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).pooler_output


def build_encoder(
    arch: dict, image_size: int, train_scale=(0.6, 1.0), hflip: float = 0.5, init_weights: str = ""
) -> tuple[nn.Module, int, TransformSettings]:
    """(encoder: pixels -> (B, F), F, transform settings), random weights unless ``init_weights`` names
    weights the tower builder knows (a packaged name such as efficientnet-lite2, a file, or hub)."""
    kind = arch.get("kind")
    if kind in ("timm", "open_clip"):
        kwargs = copy.deepcopy(arch.get("kwargs") or {})
        spec = ImageTowerSpec(kind=kind, name=arch.get("name", ""), kwargs=kwargs, weights=init_weights or None)
        tower, width, settings, _ = build_image_tower(
            spec, image_size, load_weights=bool(init_weights), train_scale=tuple(train_scale), hflip=hflip
        )
        return tower, width, settings
    if init_weights:
        raise PipelineError(f"distill.init_weights works for timm and open_clip students, not {kind!r}")
    if kind == "hf":
        kw = copy.deepcopy(arch["kwargs"])
        cfg = {**kw["config"], "image_size": image_size}
        tower = _HFVision(cfg)
        settings = TransformSettings(
            size=image_size,
            mean=tuple(kw["mean"]),
            std=tuple(kw["std"]),
            crop_pct=1.0,
            train_scale=tuple(train_scale),
            hflip=hflip,
        )
        return tower, int(tower.model.config.hidden_size), settings
    raise PipelineError(f"student image architecture kind must be timm, open_clip or hf, not {kind!r}")


class ImageClassifier(nn.Module):
    """encoder -> pooled features -> linear classifier."""

    def __init__(
        self,
        arch: dict,
        image_size: int,
        num_classes: int,
        train_scale=(0.6, 1.0),
        hflip: float = 0.5,
        channels_last: bool = False,
        init_weights: str = "",
    ):
        super().__init__()
        self.arch, self.image_size = arch, image_size
        self.encoder, self.feat_dim, self.settings = build_encoder(
            arch, image_size, train_scale, hflip, init_weights
        )
        self.classifier = nn.Linear(self.feat_dim, num_classes)
        self.channels_last = channels_last and arch.get("kind") == "timm"
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return self.encoder(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(pixels))

    def transform(self, train: bool = False) -> ImageTransform:
        return ImageTransform(self.settings, train=train)


def export_classifier(model: ImageClassifier, path: Path, classes: Sequence[str], meta: dict) -> Path:
    """One file that rebuilds the classifier with ``load_classifier`` (architecture code only)."""
    return atomic_save(
        {
            "format": EXPORT_FORMAT,
            "arch": model.arch,
            "image_size": model.image_size,
            "settings": model.settings.to_dict(),
            "classes": list(classes),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "meta": meta,
        },
        Path(path),
    )


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[ImageClassifier, list[str]]:
    blob = load_checkpoint(Path(path), "classifier export")
    if not isinstance(blob, dict) or blob.get("format") != EXPORT_FORMAT:
        raise PipelineError(f"{path} is not a clipdistill classifier export")
    s = blob["settings"]
    model = ImageClassifier(
        blob["arch"], blob["image_size"], len(blob["classes"]), s["train_scale"], s["hflip"]
    )
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), blob["classes"]


# ---- data ------------------------------------------------------------------------------------------------
class ImageRows(Dataset):
    """Item of key (epoch, row) = (row, augmented pixels or None, error); augmentation seeded by (seed, epoch, row).

    The epoch travels in the key (put there by ``EpochBatches`` in the trainer), so a loader's workers can be
    forked once per run instead of once per epoch (a worker forked late inherits, then privately copies, the
    trainer's grown heap)."""

    def __init__(
        self, locations: Sequence[str], transform: Callable, seed: int, preload_size: int | None = None
    ):
        self.locations, self.transform, self.seed = list(locations), transform, seed
        self._images: dict[int, Image.Image] = {}
        if preload_size:  # small datasets: decode once, keep downsized in RAM
            for i, loc in enumerate(self.locations):
                try:
                    img = load_rgb(loc)
                except ImageDecodeError:
                    continue
                img.thumbnail((preload_size, preload_size), Image.BICUBIC)
                self._images[i] = img

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        try:
            img = self._images.get(i) or load_rgb(self.locations[i])
        except ImageDecodeError as exc:
            return i, None, str(exc)
        with seeded_augmentation(self.seed, epoch, i):
            return i, self.transform(img), None


def _collate(items):
    ok = [(i, x) for i, x, err in items if err is None]
    if not ok:
        return torch.empty(0, dtype=torch.long), None
    return torch.tensor([i for i, _ in ok]), torch.stack([x for _, x in ok])


class EpochBatches(Sampler[list]):
    """Full batches of (epoch, row) keys of the current ``order``; set ``epoch`` and ``order`` before iterating."""

    def __init__(self, batch_size: int):
        self.batch_size, self.epoch, self.order = batch_size, 0, np.empty(0, np.int64)

    def __iter__(self):
        rows = self.order.tolist()
        for k in range(len(rows) // self.batch_size):
            yield [(self.epoch, i) for i in rows[k * self.batch_size:(k + 1) * self.batch_size]]

    def __len__(self) -> int:
        return len(self.order) // self.batch_size


def epoch_loader(dataset: ImageRows, batch_size: int, workers: int) -> tuple[DataLoader, EpochBatches]:
    """One loader for a whole training run (persistent workers) and the sampler that says which epoch and
    order it serves; undecodable images drop out of their batch."""
    batches = EpochBatches(batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                        persistent_workers=workers > 0,
                        multiprocessing_context=worker_start_method() if workers > 0 else None)
    return loader, batches


@torch.no_grad()
def predict(
    model: ImageClassifier,
    locations: Sequence[str],
    batch_size: int = 128,
    workers: int = 0,
    precision: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits (N, K), features (N, F), ok mask (N,)) with the eval transform; failed images get zeros."""
    model.eval()
    device = next(model.parameters()).device
    k = model.classifier.out_features
    logits = np.zeros((len(locations), k), np.float32)
    feats = np.zeros((len(locations), model.feat_dim), np.float32)
    ok = np.zeros(len(locations), bool)
    for batch in iter_image_batches(list(locations), model.transform(train=False), batch_size, workers):
        if batch.pixels is None:
            continue
        with autocast(device, precision):
            f = model.features(batch.pixels.to(device))
            out = model.classifier(f)
        logits[batch.positions] = out.float().cpu().numpy()
        feats[batch.positions] = f.float().cpu().numpy()
        ok[batch.positions] = True
    return logits, feats, ok


__all__ = [
    "ImageClassifier",
    "build_encoder",
    "export_classifier",
    "load_classifier",
    "ImageRows",
    "EpochBatches",
    "epoch_loader",
    "predict",
]
