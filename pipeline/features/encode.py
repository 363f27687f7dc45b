"""Encode images and captions with any encoder that implements the Teacher interface.

Used by stage 1 (per shard), by validation during training and by stage 3 evaluation, so the
one encode loop is shared. Failures are returned, never raised.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from pipeline.data.loader import iter_image_batches
from pipeline.data.manifest import Manifest
from pipeline.features.device_input import iter_device_batches
from pipeline.teachers.preprocess import TensorPreprocess
from pipeline.teachers.base import Teacher

Progress = Callable[[int], None]


class PhaseClock:
    """Seconds spent waiting for input batches (``read``: file reads, decoding, preprocessing) and in the model
    (``model``, kept by the caller); ``timed`` wraps a batch iterator and adds its waits to ``read``."""

    def __init__(self) -> None:
        self.read = 0.0
        self.model = 0.0

    def timed(self, batches: Iterable) -> Iterator:
        it = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.read += time.perf_counter() - start
                return
            self.read += time.perf_counter() - start
            yield item


def encode_image_locations(encoder: Teacher, locations: Sequence[str], batch_size: int = 64, workers: int = 2,
                           dtype=np.float32, on_progress: Progress | None = None,
                           norms_out: np.ndarray | None = None, device_preprocess: TensorPreprocess | None = None,
                           transforms: Sequence[Callable] | None = None, clock: PhaseClock | None = None):
    """Returns (embeddings (N, D) with zero rows for failures, ok mask (N,), [(position, reason)]).

    ``norms_out`` (N,), if given, receives each embedding's norm before L2 normalisation.
    ``device_preprocess``: decode JPEGs and preprocess on the encoder's device (``features.device_input``)
    instead of in the DataLoader workers. ``transforms``: one image transform per location, instead of the
    encoder's own (cached augmented views: ``features.views``). ``clock``: adds the time spent waiting for
    batches to ``clock.read``.
    """
    emb = np.zeros((len(locations), encoder.width), dtype=dtype)
    ok = np.zeros(len(locations), dtype=bool)
    failures: list[tuple[int, str]] = []
    if device_preprocess is not None and transforms is None:
        batches = iter_device_batches(locations, device_preprocess, encoder.device, batch_size, workers)
    else:
        batches = iter_image_batches(locations, transforms or encoder.image_transform(), batch_size, workers,
                                     encoder.device.type == "cuda")
    if clock is not None:
        batches = clock.timed(batches)

    def store(batch, result) -> None:
        if result is not None:
            unit, norm = result.get()
            emb[batch.positions] = unit
            if norms_out is not None:
                norms_out[batch.positions] = norm
            ok[batch.positions] = True
        failures.extend(batch.failures)
        if on_progress:
            on_progress(len(batch.positions) + len(batch.failures))

    # One batch in flight: batch k's results are copied back only after batch k+1 is queued, so on a GPU
    # the host reads, decodes and launches the next batch while the device still computes this one.
    pending = None
    for batch in batches:
        result = _HostCopy(*encoder.encode_images_with_norms(batch.pixels)) if batch.pixels is not None else None
        if pending is not None:
            store(*pending)
        pending = (batch, result)
    if pending is not None:
        store(*pending)
    return emb, ok, failures


class _HostCopy:
    """Device tensors copied to the host without blocking; ``get`` waits for the copy only."""

    def __init__(self, *tensors: torch.Tensor):
        cuda = tensors[0].device.type == "cuda"
        self.tensors = [t.to("cpu", non_blocking=cuda) for t in tensors]
        self.event = torch.cuda.Event() if cuda else None
        if self.event is not None:
            self.event.record()

    def get(self) -> list[np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return [t.numpy() for t in self.tensors]


def encode_captions(encoder: Teacher, captions: Sequence[str], batch_size: int = 256, dtype=np.float32,
                    on_progress: Progress | None = None, norms_out: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros((len(captions), encoder.width), dtype=dtype)
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start : start + batch_size])
        unit, norm = encoder.encode_texts_with_norms(encoder.tokenize(chunk))
        out[start : start + len(chunk)] = unit.cpu().numpy()
        if norms_out is not None:
            norms_out[start : start + len(chunk)] = norm.cpu().numpy()
        if on_progress:
            on_progress(len(chunk))
    return out


@dataclass
class SplitEmbeddings:
    """A split embedded for retrieval: every decodable image once, every caption of those images."""

    image_ids: np.ndarray  # (N_img,)
    image_emb: np.ndarray  # (N_img, D) float32
    sample_ids: np.ndarray  # (N_txt,)
    text_emb: np.ndarray  # (N_txt, D)
    text_image_idx: np.ndarray  # (N_txt,) row of each caption's image in image_emb
    failures: list[tuple[str, str]]  # (location, reason)


def embed_manifest(encoder: Teacher, manifest: Manifest, batch_size: int = 64, workers: int = 2,
                   on_progress: Progress | None = None) -> SplitEmbeddings:
    image_ids, paths = manifest.unique_images()
    locations = [manifest.resolve(p) for p in paths]
    img, ok, failures = encode_image_locations(encoder, locations, batch_size, workers, on_progress=on_progress)
    kept = image_ids[ok]
    row_of = {int(i): r for r, i in enumerate(kept.tolist())}
    t = manifest.table
    triples = [
        (sid, cap, row_of[iid])
        for sid, iid, cap in zip(t.column("sample_id").to_pylist(), t.column("image_id").to_pylist(),
                                 t.column("caption").to_pylist())
        if iid in row_of and cap and cap.strip()
    ]
    text = encode_captions(encoder, [c for _, c, _ in triples], on_progress=on_progress)
    return SplitEmbeddings(
        image_ids=kept,
        image_emb=img[ok],
        sample_ids=np.array([s for s, _, _ in triples], dtype=np.int64),
        text_emb=text,
        text_image_idx=np.array([r for _, _, r in triples], dtype=np.int64),
        failures=[(locations[p], reason) for p, reason in failures],
    )
