"""One split of a classification run: its labelled images, their rows in the token cache, and the text queries
the head reads (class prompts or the images' own captions)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.common import paths
from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest
from pipeline.classify.config import ClassifyConfig
from pipeline.classify.labels import LabelledImages, labelled_images
from pipeline.classify.prompts import read_prompts
from pipeline.features.cache.tokens import TokenSplit, split_path


@dataclass
class Split:
    """Labelled images of one split with their rows in the token cache."""

    name: str
    images: LabelledImages
    tokens: TokenSplit
    positions: np.ndarray  # (N,) row of each image in ``tokens``

    def __len__(self) -> int:
        return len(self.images)


def open_split(cfg: ClassifyConfig, split: str, classes: list[str], required: bool) -> Optional[Split]:
    manifest_path = paths.manifest_path(cfg.data.manifest_dir, split)
    token_path = split_path(Path(cfg.data.tokens_dir), split)
    if not manifest_path.exists() or not token_path.exists():
        if required:
            raise PipelineError(
                f"need {manifest_path} and {token_path}; run `clipdistill teacher-tokens` first"
            )
        return None
    images = labelled_images(Manifest.read(manifest_path), classes)
    if len(images) == 0:
        if required:
            raise PipelineError(f"no image of {manifest_path} has one of the {len(classes)} training labels")
        return None
    tokens = TokenSplit(token_path)
    # Images that failed to decode in teacher-tokens have no features: leave them out, counted.
    present = np.isin(images.image_ids, tokens.image_ids)
    if not present.all():
        images.skipped["no cached tokens (decode failure)"] = int((~present).sum())
        keep = np.flatnonzero(present)
        images = LabelledImages(
            images.image_ids[keep], images.labels[keep], [images.locations[i] for i in keep], images.skipped
        )
    return Split(split, images, tokens, tokens.rows_of(images.image_ids))


# ---- text queries --------------------------------------------------------------------------------------
@dataclass
class Queries:
    """prompts: ``prompts`` (K, D). captions: one row per caption with its image's index into the split."""

    mode: str
    prompts: Optional[torch.Tensor] = None
    caption_emb: Optional[np.ndarray] = None  # (M, D)
    caption_image: Optional[np.ndarray] = None  # (M,) index into the split's images


def queries_for(cfg: ClassifyConfig, split: Split, classes: list[str]) -> Queries:
    if cfg.text.mode == "prompts":
        emb = read_prompts(
            Path(cfg.data.tokens_dir),
            classes,
            list(cfg.text.templates),
            split.tokens.meta.teacher_fingerprint,
        )
        return Queries("prompts", prompts=torch.from_numpy(emb).float())
    if cfg.text.mode != "captions":
        raise PipelineError(f"text.mode must be prompts or captions, not {cfg.text.mode!r}")
    if not split.tokens.has_captions:
        raise PipelineError(
            f"{split.tokens.path} has no caption embeddings; run teacher-tokens with data.captions=true"
        )
    index = {int(i): n for n, i in enumerate(split.images.image_ids.tolist())}
    keep = [j for j, i in enumerate(split.tokens.caption_image_ids.tolist()) if i in index]
    return Queries(
        "captions",
        caption_emb=split.tokens.caption_embedding[keep].astype(np.float32),
        caption_image=np.array([index[int(split.tokens.caption_image_ids[j])] for j in keep], np.int64),
    )


__all__ = ["Split", "open_split", "Queries", "queries_for"]
