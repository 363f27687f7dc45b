"""Small helpers shared by the stage entry points."""

from __future__ import annotations

import os

import torch


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when a GPU is visible (this rank's GPU under torchrun), else cpu."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
