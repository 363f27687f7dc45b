"""Small helpers shared by the stage entry points (kept light: `--help` must not import torch)."""

from __future__ import annotations

import typer

from pipeline.common.io import set_trust_unchecked

__all__ = ["resolve_device", "TRUST_UNCHECKED"]

def _trust(on: bool) -> bool:
    set_trust_unchecked(on)  # this process and those it starts (an environment variable)
    return on


# The one switch of the checksum rule (common.io.verify_file), on every command that loads stored files; it takes
# effect while the command line is parsed.
TRUST_UNCHECKED = typer.Option(False, "--trust-unchecked", callback=_trust, help="Use stored files that carry no "
                               "checksum (written before checksums, or the checksum was removed); damaged files are "
                               "refused anyway.")


def resolve_device(name: str):
    from pipeline.common.distributed import resolve_device as resolve

    return resolve(name)

