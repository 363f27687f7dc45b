"""Data for the adaptation trainer (``pipeline.adapt.trainer``): the training split as labelled pairs plus
consistency images/captions, and a step-indexed dataset whose item is one step's whole batch.

Everything an item holds is a function of (seed, step): the rows come from seeded per-pass permutations
(``stream``) and each view's augmentation from a seed of (seed, step, slot, view), so a resumed run draws
exactly what the uninterrupted one would have, whatever the number of loader workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from pipeline.adapt.consistency import draw_labelled_images
from pipeline.common.errors import PipelineError
from pipeline.data.images import ImageDecodeError, load_rgb
from pipeline.data.loader import seeded_augmentation
from pipeline.distill.losses import caption_hashes
from pipeline.data.manifest import Manifest
from pipeline.students import ImageTransform

@dataclass
class TrainSplit:
    """Rows of the training manifest whose image decodes, split into labelled and consistency streams."""

    image_ids: np.ndarray  # (N_img,) decodable images
    locations: list[str]  # (N_img,)
    row_image: np.ndarray  # (N_rows,) index into image_ids of each kept caption row; -1: a caption-only row
    captions: list[str]  # (N_rows,)
    caption_hash: np.ndarray  # (N_rows,)
    labelled_ids: np.ndarray  # labelled image ids
    labelled_rows: np.ndarray  # rows (pairs) of labelled images
    cons_images: np.ndarray  # image indices that get the image consistency loss
    cons_rows: np.ndarray  # caption rows that get the text consistency loss (used as unpaired text)
    failures: list[tuple[str, str]]  # (location, reason) of images that did not decode

    def summary(self) -> dict:
        return {"images": len(self.image_ids), "pairs": len(self.captions),
                "draw_labelled_images": len(self.labelled_ids), "labelled_pairs": len(self.labelled_rows),
                "consistency_images": len(self.cons_images), "consistency_captions": len(self.cons_rows),
                "undecodable_images": len(self.failures)}


def build_split(manifest: Manifest, labelled_fraction: float, seed: int, consistency_data: str = "all",
                mean_teacher: bool = True, decodable: set[str] | None = None,
                failures: list[tuple[str, str]] | None = None) -> TrainSplit:
    """Labelled images are drawn from the decodable images that have a caption (``decodable``: locations; None =
    all). Declared unpaired rows are consistency data only: an image-only row's image, a caption-only row's
    caption (the domain's unlabelled images and unpaired captions).

    ``consistency_data``: "all" (every image and caption gets the consistency loss) or "unlabelled".
    """
    image_ids_all, paths = manifest.unique_images()
    locations_all = [manifest.resolve(p) for p in paths]
    keep = [i for i, loc in enumerate(locations_all) if decodable is None or loc in decodable]
    image_ids = image_ids_all[keep].astype(np.int64)
    locations = [locations_all[i] for i in keep]
    index_of = {int(iid): k for k, iid in enumerate(image_ids.tolist())}
    t = manifest.table
    row_image, captions = [], []
    for iid, cap, path in zip(t.column("image_id").to_pylist(), t.column("caption").to_pylist(),
                              t.column("image_path").to_pylist()):
        if not cap or not cap.strip():
            continue  # an image-only row: its image is already among image_ids
        if path is None or int(iid) in index_of:
            row_image.append(-1 if path is None else index_of[int(iid)])
            captions.append(cap)
    row_image = np.asarray(row_image, dtype=np.int64)
    paired = row_image >= 0
    if not paired.any():
        raise PipelineError("no training pair has a decodable image and a caption")
    labelled = draw_labelled_images(image_ids[np.unique(row_image[paired])], labelled_fraction, seed)
    is_lab_img = np.isin(image_ids, labelled)
    lab_row = paired & is_lab_img[row_image.clip(0)]
    lab_rows = np.flatnonzero(lab_row)
    if len(lab_rows) == 0:
        raise PipelineError("the labelled images have no captions")
    if consistency_data == "all":
        cons_images, cons_rows = np.arange(len(image_ids)), np.arange(len(row_image))
    else:
        cons_images, cons_rows = np.flatnonzero(~is_lab_img), np.flatnonzero(~lab_row)
    if mean_teacher and (len(cons_images) == 0 or len(cons_rows) == 0):
        raise PipelineError("mean_teacher with consistency.data=unlabelled needs unlabelled images and "
                            "captions: use labelled_fraction < 1 or consistency.data=all")
    return TrainSplit(image_ids, locations, row_image, captions, caption_hashes(captions), labelled,
                      lab_rows, cons_images, cons_rows, failures or [])


def stream(n: int, start: int, count: int, seed: int, tag: int) -> np.ndarray:
    """Positions ``start .. start+count-1`` of an endless stream over ``range(n)``: one seeded permutation
    per pass, so a step's items depend only on (seed, tag, step)."""
    pos = np.arange(start, start + count, dtype=np.int64)
    cycle = pos // n
    out = np.empty(count, dtype=np.int64)
    for c in np.unique(cycle):
        perm = np.random.default_rng([seed, tag, int(c)]).permutation(n)
        sel = cycle == c
        out[sel] = perm[pos[sel] % n]
    return out


class StepBatches(Dataset):
    """Item ``step`` = that step's whole batch: labelled rows with their pixels, and (mean_teacher)
    consistency images as two differently augmented views plus consistency caption rows."""

    def __init__(self, split: TrainSplit, transform: ImageTransform, seed: int, batch_size: int,
                 unlabelled_batch_size: int, mean_teacher: bool, images: dict[str, Image.Image] | None = None):
        self.split, self.transform, self.seed = split, transform, seed
        self.batch_size, self.unlabelled_batch_size = batch_size, unlabelled_batch_size
        self.images = images or {}
        self.mean_teacher = mean_teacher

    def __len__(self) -> int:  # indexed by step; the sampler decides which steps are drawn
        return 2**62

    def _view(self, image: int, step: int, slot: int, view: int) -> torch.Tensor | None:
        loc = self.split.locations[image]
        try:
            img = self.images.get(loc) or load_rgb(loc)
        except ImageDecodeError:
            return None
        # Augmentation seeded by (seed, step, slot, view): identical on resume, any number of workers.
        with seeded_augmentation(self.seed, step, slot, view):
            return self.transform(img)

    def __getitem__(self, step: int) -> dict:
        s, seed, bs = self.split, self.seed, self.batch_size
        rows = s.labelled_rows[stream(len(s.labelled_rows), step * bs, bs, seed, 1)]
        views = [(r, self._view(int(s.row_image[r]), step, k, 0)) for k, r in enumerate(rows.tolist())]
        ok = [(r, v) for r, v in views if v is not None]
        out = {"rows": torch.tensor([r for r, _ in ok], dtype=torch.long),
               "pixels": torch.stack([v for _, v in ok]) if ok else torch.empty(0),
               "failed": len(views) - len(ok)}
        if self.mean_teacher:
            b = self.unlabelled_batch_size
            imgs = s.cons_images[stream(len(s.cons_images), step * b, b, seed, 2)]
            pairs = [(self._view(int(i), step, 10_000 + k, 1), self._view(int(i), step, 10_000 + k, 2))
                     for k, i in enumerate(imgs.tolist())]
            pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
            out["failed"] += len(imgs) - len(pairs)
            out["u_student"] = torch.stack([p[0] for p in pairs]) if pairs else torch.empty(0)
            out["u_teacher"] = torch.stack([p[1] for p in pairs]) if pairs else torch.empty(0)
            out["u_rows"] = torch.from_numpy(s.cons_rows[stream(len(s.cons_rows), step * b, b, seed, 3)])
        return out


class StepRange(Sampler[int]):
    """Steps ``start .. stop-1`` in order (a resumed run starts at its saved step)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def preload_images(locations: list[str], size: int) -> tuple[dict[str, Image.Image], list[tuple[str, str]]]:
    """Decode every image once, downsized so its shorter side stays >= ``size``; failures are returned."""
    images, failures = {}, []
    for loc in dict.fromkeys(locations):
        try:
            img = load_rgb(loc)
        except ImageDecodeError as exc:
            failures.append((loc, str(exc)))
            continue
        w, h = img.size
        scale = size / min(w, h)
        if scale < 1:
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        images[loc] = img
    return images, failures


def decodable_locations(locations: list[str]) -> tuple[set[str], list[tuple[str, str]]]:
    """Decode each image once (not kept), so the labelled split holds only images a step can load."""
    ok, failures = set(), []
    for loc in dict.fromkeys(locations):
        try:
            load_rgb(loc)
            ok.add(loc)
        except ImageDecodeError as exc:
            failures.append((loc, str(exc)))
    return ok, failures


__all__ = ["TrainSplit", "build_split", "stream", "StepBatches", "StepRange", "preload_images",
           "decodable_locations"]
