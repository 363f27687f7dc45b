"""Stage 0 (a new domain): named line icons from npm packages, split by concept (issue 14's adaptation target)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.common.errors import PipelineError


def build_icons(
    out: Path = typer.Option(Path("data/line-icons"), help="Output folder: images/, split manifests, summary.json."),
    sets: str = typer.Option("mdi,tabler,lucide", help="Comma-separated icon sets (npm Iconify packages)."),
    size: int = typer.Option(224, help="Rendered PNG width and height in pixels."),
    npm_cache: Path = typer.Option(Path("artifacts/npm"), help="Where npm tarballs are fetched to and unpacked."),
    npm_lock: Optional[Path] = typer.Option(
        None, help="The npm packages' pinned versions and sha512s (default: the project's, "
                   "pipeline/data/datasets/npm-lock.json; `make npm-lock` rewrites it)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N icons per set (quick trials)."),
) -> None:
    """Render named line icons (captions = their names) into train/val/test manifests, variants of one concept
    kept in one split across all sets."""
    from pipeline.data.datasets.icons import build_icons as build

    wanted = [s.strip() for s in sets.split(",") if s.strip()]
    if not wanted:
        raise PipelineError("--sets names no icon set")
    s = build(out, wanted, npm_cache, size=size, limit=limit, npm_lock=npm_lock)
    typer.echo(f"  {s['images']} images of {s['concepts']} concepts, {s['rejects']} rejects -> {out}")
    for split, per_set in s["splits"].items():
        seen = ", ".join(f"{name} {c['images']}" for name, c in per_set.items())
        typer.echo(f"  {split:<6} images: {seen}")
