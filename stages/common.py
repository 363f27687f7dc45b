"""Small helpers shared by the stage entry points."""

from __future__ import annotations

from pipeline.distributed import resolve_device

__all__ = ["resolve_device", "human_bytes"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
