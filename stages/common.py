"""Small helpers shared by the stage entry points (kept light: `--help` must not import torch)."""

from __future__ import annotations

import typer

from pipeline.common.io import human_bytes  # noqa: F401  (the commands' size format)
from pipeline.common.io import set_trust_unchecked

__all__ = ["resolve_device", "human_bytes", "TRUST_UNCHECKED", "trust"]

# The one switch of the checksum rule (common.io.verify_file), on every command that loads stored files.
TRUST_UNCHECKED = typer.Option(False, "--trust-unchecked", help="Use stored files that carry no checksum (written "
                               "before checksums, or the checksum was removed); damaged files are refused anyway.")


def trust(on: bool) -> None:
    """Set the switch for this process and the ones it starts (an environment variable)."""
    set_trust_unchecked(on)


def resolve_device(name: str):
    from pipeline.common.distributed import resolve_device as resolve

    return resolve(name)

