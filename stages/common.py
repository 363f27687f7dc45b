"""Small helpers shared by the stage entry points (kept light: `--help` must not import torch)."""

from __future__ import annotations

__all__ = ["resolve_device", "human_bytes"]


def resolve_device(name: str):
    from pipeline.common.distributed import resolve_device as resolve

    return resolve(name)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
