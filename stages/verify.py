"""Check stored files against their recorded checksums: a cache, a token cache, a run folder or a single file."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.common import TRUST_UNCHECKED


def verify(
    path: Path = typer.Argument(..., help="A folder (artifacts/, runs/, a cache, a run) or one file: shards, token "
                                          "caches, class prompts, checkpoints, exports, LiT heads, TorchScript, "
                                          "ONNX graphs, FAISS indexes."),
    trust_unchecked: bool = TRUST_UNCHECKED,
) -> None:
    """One line per file: ok, damaged (with what differs), missing or unchecked; exit 1 on any damage, and on
    unchecked files (which loaders refuse) unless --trust-unchecked."""
    from pipeline.features.cache.integrity import verify_tree

    findings = verify_tree(path)
    for f in findings:
        typer.echo(f"{f.status:<9} {f.path}" + (f": {f.detail}" if f.detail else ""))
    bad = sum(f.bad for f in findings)
    unchecked = 0 if trust_unchecked else sum(f.status == "unchecked" for f in findings)
    if bad or unchecked:
        typer.echo(f"{bad} damaged or missing, {unchecked} unchecked" + (
            " (loaders refuse them; --trust-unchecked accepts them)" if unchecked else ""))
        raise typer.Exit(1)
    typer.echo("all checked files are intact")
