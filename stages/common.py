"""Small helpers shared by the stage entry points (kept light: `--help` must not import torch)."""

from __future__ import annotations

from pipeline.common.io import human_bytes  # noqa: F401  (the commands' size format)

__all__ = ["resolve_device", "human_bytes"]


def resolve_device(name: str):
    from pipeline.common.distributed import resolve_device as resolve

    return resolve(name)

