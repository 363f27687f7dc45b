"""Stage 0 (teacher data): render a multi-style emoji corpus from npm icon packages (issue 12)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.common.errors import PipelineError


def build_corpus(
    out: Path = typer.Option(Path("data/emoji-corpus"), help="Output folder: images/, train.parquet, summary.json."),
    styles: str = typer.Option("noto,twemoji,fluent-flat,fluent-hc,emojione,fxemoji",
                               help="Comma-separated styles (npm Iconify packages; see `--styles help`)."),
    size: int = typer.Option(224, help="Rendered PNG width and height in pixels (openmoji's is 224)."),
    npm_cache: Path = typer.Option(Path("artifacts/npm"), help="Where npm tarballs are fetched to and unpacked."),
    npm_lock: Optional[Path] = typer.Option(
        None, help="The npm packages' pinned versions and sha512s (default: the project's, "
                   "pipeline/data/datasets/npm-lock.json; `make npm-lock` rewrites it)."),
    exclude_concepts: Optional[Path] = typer.Option(
        None, help="A manifest whose concepts (emoji, all their variants) are left out, e.g. "
                   "data/openmoji/test.parquet for the zero-shot-concept teacher."),
    limit: Optional[int] = typer.Option(None, help="Only the first N icons per style (quick trials)."),
    captions: str = typer.Option("name", help="Caption kinds, comma-separated: name (CLDR name and aliases), "
                                              "keywords (+ one caption of CLDR keywords, npm cldr-annotations-full)."),
    benchmark: Optional[Path] = typer.Option(
        None, help="A benchmark dataset folder (data/openmoji): write the teacher's world, train = corpus + the "
                   "benchmark's train split, val = a 4% corpus slice, test = the benchmark's test split."),
) -> None:
    """Render every style's emoji icons and write their manifest (every row is teacher training data)."""
    from pipeline.data.datasets.corpus import STYLES, build_corpus as build
    from pipeline.data.manifest import Manifest

    wanted = [s.strip() for s in styles.split(",") if s.strip()]
    if wanted == ["help"]:
        for name, package in STYLES.items():
            typer.echo(f"  {name:<12} {package}")
        return
    if not wanted:
        raise PipelineError("--styles names no style")
    exclude = Manifest.read(exclude_concepts) if exclude_concepts else None
    result = build(out, wanted, npm_cache, size=size, limit=limit, exclude=exclude, benchmark=benchmark,
                   captions=tuple(c.strip() for c in captions.split(",") if c.strip()), npm_lock=npm_lock)
    s = result.summary
    for style, c in s["styles"].items():
        typer.echo(f"  {style:<12} {c['icons']:>5} icons, {c['emoji']:>5} emoji, {c['excluded']:>4} excluded, "
                   f"{c['images']:>5} images, {c['captions']:>5} captions")
    typer.echo(f"  total        {s['images']} images, {s['pairs']} pairs, {s['rejects']} rejects -> {out}")
    for split, styles_seen in s["splits"].items():
        seen = ", ".join(f"{st} {c['images']}/{c['pairs']}" for st, c in styles_seen.items())
        typer.echo(f"  {split:<12} images/pairs: {seen}")
