"""Stage 1's device input path: bytes read in workers, JPEGs decoded and preprocessed on the accelerator.

On a GPU, decoding and resizing in CPU workers caps stage 1 far below the teacher's forward (clip-retrieval's
ViT-L/14 runs at about 312 images/s per A100, bounded by CPU decoding). Here workers only read bytes (files or
tar members) and decode what the GPU cannot (PNG, WebP, ... via PIL, composited on white as everywhere else);
JPEGs are decoded in batches by nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``) and resized, cropped
and normalised on the device with the teacher's own eval preprocessing (``TensorPreprocess``, which a teacher
states with ``Teacher.tensor_preprocess``). On a CPU device the same code runs with libjpeg, so the tests
compare it with the PIL path there; the workers path (``pipeline.data.loader``) stays the CPU default.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.common.errors import PipelineError
from pipeline.data.images import ImageDecodeError, decode_rgb, read_bytes
from pipeline.data.loader import ImageBatch
from pipeline.teachers.preprocess import TensorPreprocess

DECODE_CHOICES = ("auto", "cpu", "device")
_JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    return data[:3] == _JPEG_MAGIC


def choose_decode(choice: str, device: torch.device, preprocess: TensorPreprocess | None) -> bool:
    """Whether stage 1 uses the device input path: ``auto`` = on CUDA when the teacher states its
    preprocessing as tensor ops; ``device`` insists (one-line error when the teacher cannot); ``cpu`` never."""
    if choice not in DECODE_CHOICES:
        raise PipelineError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, not {choice!r}")
    if choice == "device" and preprocess is None:
        raise PipelineError("--decode device: this teacher's preprocessing has no tensor form "
                            "(Teacher.tensor_preprocess); use --decode cpu")
    return preprocess is not None and (choice == "device" or (choice == "auto" and device.type == "cuda"))


class _EncodedDataset(Dataset):
    """Item = (position, kind, payload, error): JPEG bytes for the device to decode, or pixels PIL decoded."""

    def __init__(self, locations: Sequence[str]):
        self.locations = list(locations)

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, i: int):
        location = self.locations[i]
        try:
            data = read_bytes(location)
            if is_jpeg(data):
                return i, "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), None
            return i, "pixels", _pil_pixels(data, location), None
        except ImageDecodeError as exc:
            return i, None, None, str(exc)


def _pil_pixels(data: bytes, location: str) -> torch.Tensor:
    from torchvision.transforms.v2.functional import pil_to_tensor

    return pil_to_tensor(decode_rgb(data, location))  # uint8 (3, H, W), alpha composited on white


def _collate(items):
    return items  # variable-sized payloads: grouped in the main process


def decode_jpeg(data, mode, device: str):
    """torchvision's (nv)JPEG decoder. torchvision 0.29 deprecates its image decoders in favour of TorchCodec;
    they still ship and nvJPEG batching is what this path needs, so the notice is silenced here only."""
    import warnings

    from torchvision import io as tvio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return tvio.decode_jpeg(data, mode=mode, device=device)


def decode_jpegs(datas: list[torch.Tensor], locations: list[str], device: torch.device
                 ) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """Batched JPEG decode on ``device`` (nvJPEG on CUDA, libjpeg on CPU) -> (images, errors) per input.

    One corrupt file fails a batched call, so a failed batch is retried per image; a JPEG the decoder
    refuses (CMYK, arithmetic coding) falls back to PIL before it counts as a failure.
    """
    from torchvision.io import ImageReadMode

    if not datas:
        return [], []
    target = "cuda" if device.type == "cuda" else "cpu"
    try:
        images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=target)
        return [img.to(device) for img in images], [None] * len(datas)
    except RuntimeError:
        pass
    images, errors = [], []
    for data, location in zip(datas, locations):
        try:
            images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=target).to(device))
            errors.append(None)
        except RuntimeError:
            try:
                images.append(_pil_pixels(bytes(data.numpy()), location).to(device))
                errors.append(None)
            except ImageDecodeError as exc:
                images.append(None)
                errors.append(str(exc))
    return images, errors


def iter_device_batches(locations: Sequence[str], preprocess: TensorPreprocess, device: torch.device,
                        batch_size: int = 64, num_workers: int = 2) -> Iterator[ImageBatch]:
    """Like ``iter_image_batches``, with decoding and preprocessing on ``device``; failures reported, not raised."""
    if not locations:
        return
    loader = DataLoader(_EncodedDataset(locations), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_collate, pin_memory=False,
                        prefetch_factor=4 if num_workers > 0 else None)
    pin = device.type == "cuda"
    for items in loader:
        failures = [(i, err) for i, kind, _, err in items if kind is None]
        jpegs = [(i, data) for i, kind, data, _ in items if kind == "jpeg"]
        decoded, errors = decode_jpegs([d for _, d in jpegs], [locations[i] for i, _ in jpegs], device)
        ready: dict[int, torch.Tensor] = {}
        for (i, _), img, err in zip(jpegs, decoded, errors):
            if err is None:
                ready[i] = img
            else:
                failures.append((i, err))
        for i, kind, pixels, _ in items:
            if kind == "pixels":  # pinned so the copy overlaps the device's work on the previous batch
                ready[i] = (pixels.pin_memory() if pin else pixels).to(device, non_blocking=True)
        positions = sorted(ready)
        try:
            batch = preprocess([ready[i] for i in positions]) if positions else None
        except RuntimeError:  # e.g. an image too small for the kernel: judged one by one
            batch, positions = _preprocess_one_by_one(preprocess, ready, positions, failures)
        yield ImageBatch(positions, batch, sorted(failures))


def _preprocess_one_by_one(preprocess, ready, positions, failures):
    kept, tensors = [], []
    for i in positions:
        try:
            tensors.append(preprocess([ready[i]]))
            kept.append(i)
        except RuntimeError as one:
            failures.append((i, f"cannot preprocess: {one}"))
    return (torch.cat(tensors) if tensors else None), kept


__all__ = ["DECODE_CHOICES", "choose_decode", "decode_jpegs", "is_jpeg",
           "iter_device_batches"]
