"""Mixed precision, decided in one place for teachers, students and trainers."""

from __future__ import annotations

import contextlib

import torch

from pipeline.common.errors import PipelineError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_precision(precision: str, allowed: tuple[str, ...] = PRECISIONS) -> str:
    if precision not in allowed:
        raise PipelineError(f"precision must be one of {', '.join(allowed)}, not {precision!r}")
    return precision


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """``auto``: bf16 autocast on CUDA (fp16 on GPUs without bf16), full precision elsewhere; ``fp32``, ``bf16``
    and ``fp16`` force it."""
    check_precision(precision)
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if precision == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
