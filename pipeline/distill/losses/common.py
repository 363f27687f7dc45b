"""What every stage-2 loss shares: its inputs, float32 maths, id tensors, shape checks, caption hashes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.common.errors import PipelineError

if TYPE_CHECKING:  # typing only: the queue module does not depend on the losses
    from pipeline.distill.queue import ActiveQueue


@dataclass
class LossInputs:
    """One step's inputs to every loss (B = batch rows, D = teacher width)."""

    s_img: Tensor  # (B, D) student embeddings, L2-normalised
    s_txt: Tensor
    t_img: Tensor  # (B, D) cached teacher embeddings of the same rows, L2-normalised
    t_txt: Tensor
    img_ids: Tensor  # (B,) int64 image_id of each row (rows of one image share it)
    queue: "ActiveQueue | None" = None  # the negatives (pipeline.distill.queue), for losses that use them
    captions_hash: Tensor | None = None  # (B,) optional int64 caption hashes (``caption_hashes``)
    # Transfer images (no caption, pipeline.distill.transfer): they join the image-only terms, never the
    # cross-modal ones. (T, D), (T, D), (T,); None without transfer data.
    more_s_img: Tensor | None = None
    more_t_img: Tensor | None = None
    more_img_ids: Tensor | None = None
    # Transfer captions (no image): they join the text-only terms. (U, D), (U, D), (U,) ids, (U,) caption hashes.
    more_s_txt: Tensor | None = None
    more_t_txt: Tensor | None = None
    more_txt_ids: Tensor | None = None
    more_txt_hash: Tensor | None = None

    def texts(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(student, teacher, ids, caption hashes) of every caption of the step: the pairs', then the transfer
        captions. Hashes are None when the pairs carry none."""
        if self.more_s_txt is None or len(self.more_s_txt) == 0:
            return self.s_txt, self.t_txt, self.img_ids, self.captions_hash
        dev = self.s_txt.device
        ids = torch.cat([torch.as_tensor(self.img_ids, dtype=torch.int64, device=dev),
                         torch.as_tensor(self.more_txt_ids, dtype=torch.int64, device=dev)])
        hashes = None
        if self.captions_hash is not None:
            hashes = torch.cat([torch.as_tensor(self.captions_hash, dtype=torch.int64, device=dev),
                                torch.as_tensor(self.more_txt_hash, dtype=torch.int64, device=dev)])
        return torch.cat([self.s_txt, self.more_s_txt]), torch.cat([self.t_txt, self.more_t_txt]), ids, hashes

    def images(self) -> tuple[Tensor, Tensor, Tensor]:
        """(student, teacher, ids) of every image of the step: the pairs' images, then the transfer images."""
        if self.more_s_img is None or len(self.more_s_img) == 0:
            return self.s_img, self.t_img, self.img_ids
        ids = torch.as_tensor(self.img_ids, dtype=torch.int64, device=self.s_img.device)
        more_ids = torch.as_tensor(self.more_img_ids, dtype=torch.int64, device=self.s_img.device)
        return (torch.cat([self.s_img, self.more_s_img]), torch.cat([self.t_img, self.more_t_img]),
                torch.cat([ids, more_ids]))


def caption_hashes(captions: Sequence[str]) -> np.ndarray:
    """Stable int64 hash per caption, for false-negative masking of identical captions.

    Case and runs of whitespace are ignored: the usual text towers (CLIP BPE, uncased BERT) map such
    variants to (nearly) the same embedding, so treating them as negatives is the same mistake.
    """
    out = np.empty(len(captions), dtype=np.int64)
    for i, c in enumerate(captions):
        key = " ".join(str(c).split()).casefold().encode("utf-8")
        out[i] = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True)
    return out


def _f32(x: Tensor) -> Tensor:
    return x.float()


def _ids(x: Tensor | np.ndarray | Sequence[int] | None, device: torch.device) -> Tensor | None:
    if x is None:
        return None
    return torch.as_tensor(x, dtype=torch.int64, device=device)


def _check_pair(a: Tensor, b: Tensor, what: str) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise PipelineError(f"{what}: expected two (B, D) tensors of equal shape, got {tuple(a.shape)} "
                            f"and {tuple(b.shape)}")
