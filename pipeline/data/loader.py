"""Batched image decoding in DataLoader workers that tolerates bad images.

Workers decode and preprocess; a failure becomes an error string in the batch instead of an
exception, so one corrupt file never stops a run (the caller records it as a reject).
"""

from __future__ import annotations

import contextlib
import os
import sys

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from pipeline.data.images import ImageDecodeError, load_rgb


@contextlib.contextmanager
def seeded_augmentation(*key: int) -> Iterator[None]:
    """Inside: the CPU generator seeded from ``key`` (e.g. seed, epoch, index), so an item's augmentation is a pure
    function of it (identical on resume, with any number of workers); the generator's state is restored after.
    Seeds the CPU generator alone, as ``torch.manual_seed`` does for it: that call also queues a seed for each
    accelerator backend and records a stack trace for each, about a third of a loader worker's time per image."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(hash(key) & 0x7FFFFFFF)
        yield


def yielding_worker(worker_id: int) -> None:
    """A loader worker's start: one step lower priority than the training process, so on a machine with few cores
    it fills the cores the step leaves idle (single-threaded phases, the optimizer) instead of taking one from the
    step's compute threads; it prefetches batches ahead, so the step rarely waits for it. Results are unchanged
    (augmentation is seeded per item)."""
    if hasattr(os, "nice"):
        try:
            os.nice(5)
        except OSError:  # not permitted here: keep the inherited priority
            pass


def worker_start_method() -> str | None:
    """How DataLoader workers start: fork where the platform has it (Linux), so they share the parent's preloaded
    pixels copy-on-write as they do under a shell-started command, even in a process that was itself spawned (the
    experiment runner's runs), whose default would be spawn; elsewhere the platform's default."""
    return "fork" if sys.platform.startswith("linux") else None


@dataclass
class ImageBatch:
    positions: list[int]  # positions (into the caller's location list) of decoded images
    pixels: torch.Tensor | None  # (len(positions), C, H, W) or None if all failed
    failures: list[tuple[int, str]]  # (position, reason) for images that failed


class _ImageDataset(Dataset):
    def __init__(self, locations: Sequence[str], transform: Callable | Sequence[Callable]):
        self.locations = list(locations)
        self.transform = transform  # one for all, or one per location

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, i: int):
        try:
            transform = self.transform if callable(self.transform) else self.transform[i]
            return i, transform(load_rgb(self.locations[i])), None
        except ImageDecodeError as exc:
            return i, None, str(exc)
        except Exception as exc:  # a transform that chokes on a weird image is a reject too
            return i, None, f"cannot preprocess {self.locations[i]}: {exc}"


def _collate(items) -> ImageBatch:
    ok = [(i, x) for i, x, err in items if err is None]
    failures = [(i, err) for i, _, err in items if err is not None]
    # a tensor per image, or a dict of them (an ensemble's members' inputs): stacked per key
    pixels = default_collate([x for _, x in ok]) if ok else None
    return ImageBatch([i for i, _ in ok], pixels, failures)


def iter_image_batches(
    locations: Sequence[str],
    transform: Callable | Sequence[Callable],
    batch_size: int = 64,
    num_workers: int = 2,
    pin_memory: bool = False,
) -> Iterator[ImageBatch]:
    """Yield decoded, preprocessed batches in order; failures are reported, never raised. ``transform``: one
    for every image, or one per location."""
    if not locations:
        return iter(())
    loader = DataLoader(
        _ImageDataset(locations, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        multiprocessing_context=worker_start_method() if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    return iter(loader)


def batched(seq: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]
