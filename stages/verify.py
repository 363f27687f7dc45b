"""Check stored files against their recorded checksums: a cache, a token cache, a run folder or a single file."""

from __future__ import annotations

from pathlib import Path

import typer


def verify(
    path: Path = typer.Argument(..., help="A cache (dataset x teacher folder or one split), a token cache, a run "
                                          "folder, a shard, a checkpoint or an export."),
) -> None:
    """One line per file: ok, damaged (with what differs), missing or unchecked; exit 1 on any damage."""
    from pipeline.features.cache.integrity import verify_tree

    findings = verify_tree(path)
    for f in findings:
        typer.echo(f"{f.status:<9} {f.path}" + (f": {f.detail}" if f.detail else ""))
    bad = sum(f.bad for f in findings)
    typer.echo(f"{bad} damaged or missing" if bad else "all checked files are intact")
    if bad:
        raise typer.Exit(1)
