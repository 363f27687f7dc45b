"""Stage 0: read a dataset in one of the supported formats and write its parquet manifests."""

from __future__ import annotations

import inspect
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest, write_splits
from pipeline.data.readers import FORMATS, READERS, read_dataset
from pipeline.data.readers.common import all_images_missing_error

_FORMAT_HELP = "Dataset format: " + "; ".join(f"{k} = {v}" for k, v in FORMATS.items())
_INPUT_HELP = (
    "Split JSON (karpathy, coco), table file (tabular), image folder (folder), "
    "or shard folder / .tar file (webdataset)."
)
_ROOT_HELP = "karpathy, coco, tabular: folder image paths are relative to (default: the input's folder)."
_FRACTIONS_HELP = (
    "tabular, folder, webdataset: assign splits by hashing the image, e.g. train=0.9,val=0.05,test=0.05 "
    "(default: all train)."
)

# Annotated options keep plain defaults, so the function can also be called directly (tests, scripts).
Fmt = Annotated[str, typer.Argument(metavar="FORMAT", help=_FORMAT_HELP, show_default=False)]
Input = Annotated[Path, typer.Argument(metavar="INPUT", help=_INPUT_HELP, show_default=False)]
Out = Annotated[Path, typer.Option(help="Output folder for <split>.parquet and rejects.parquet.")]
ImageRoot = Annotated[Optional[Path], typer.Option(help=_ROOT_HELP)]
ImageCol = Annotated[Optional[str], typer.Option(help="tabular: image path column (default: image_path).")]
CaptionCol = Annotated[Optional[str], typer.Option(help="tabular: caption column (default: caption).")]
SplitCol = Annotated[Optional[str], typer.Option(help="tabular: optional split column.")]
LabelCol = Annotated[Optional[str], typer.Option(help="tabular: optional class label column.")]
ImageIdCol = Annotated[
    Optional[str], typer.Option(help="tabular: optional integer image id column (default: by first use).")
]
SampleIdCol = Annotated[
    Optional[str], typer.Option(help="tabular: optional integer sample id column (default: row number).")
]
Delimiter = Annotated[
    Optional[str], typer.Option(help="tabular: field separator of a text table with another suffix.")
]
Split = Annotated[Optional[str], typer.Option(help="coco, captions: split name of the file's rows (default: "
                                              "train).")]
RestvalToTrain = Annotated[
    bool, typer.Option("--restval-to-train", help="karpathy: fold the restval split into train.")
]
LabelsFromParent = Annotated[
    bool, typer.Option("--labels-from-parent", help="folder: label images by their parent folder name.")
]
SplitFractions = Annotated[Optional[str], typer.Option(help=_FRACTIONS_HELP)]
UnpairedCol = Annotated[
    Optional[str], typer.Option(help="tabular: optional flag column (1/0, true/false); flagged rows are unpaired "
                                "transfer data: an image with an empty caption, or a caption with an empty image "
                                "path.")
]
Unpaired = Annotated[
    bool, typer.Option("--unpaired", help="folder, webdataset, coco, karpathy: keep images without a caption "
                       "(no sidecar, no .txt/.json caption, no annotation, no sentences) as image-only rows (transfer "
                       "data for distillation) instead of rejecting them; a folder or shards of images alone work.")
]


def build_manifest(
    fmt: Fmt,
    path: Input,
    out: Out,
    image_root: ImageRoot = None,
    image_col: ImageCol = None,
    caption_col: CaptionCol = None,
    split_col: SplitCol = None,
    label_col: LabelCol = None,
    image_id_col: ImageIdCol = None,
    sample_id_col: SampleIdCol = None,
    delimiter: Delimiter = None,
    split: Split = None,
    restval_to_train: RestvalToTrain = False,
    labels_from_parent: LabelsFromParent = False,
    split_fractions: SplitFractions = None,
    unpaired: Unpaired = False,
    unpaired_col: UnpairedCol = None,
) -> dict[str, Path]:
    """Read a dataset and write <out>/<split>.parquet manifests plus <out>/rejects.parquet."""
    given = {
        "image_root": image_root, "image_col": image_col, "caption_col": caption_col, "split_col": split_col,
        "label_col": label_col, "image_id_col": image_id_col, "sample_id_col": sample_id_col,
        "delimiter": delimiter, "split": split, "split_fractions": split_fractions,
        # Flags are passed only when set, so an inapplicable flag is reported rather than ignored.
        "restval_to_train": restval_to_train or None, "labels_from_parent": labels_from_parent or None,
        "unpaired": unpaired or None, "unpaired_col": unpaired_col,
    }
    options = {k: v for k, v in given.items() if v is not None}
    reader = READERS.get(fmt)
    if reader is not None:
        accepted = inspect.signature(reader).parameters
        stray = [f"--{k.replace('_', '-')}" for k in options if k not in accepted]
        if stray:
            raise PipelineError(f"{', '.join(stray)} does not apply to format {fmt!r}")
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} exists and is not a folder")
    manifest = read_dataset(fmt, path=path, **options)

    paths = write_splits(manifest, out)
    _print_summary(manifest, paths)
    stale = sorted(p.name for p in out.glob("*.parquet") if p not in paths.values())
    if stale:
        typer.echo(f"note: {out} also holds {stale} from an earlier build; they were not rewritten")
    missing = all_images_missing_error(manifest.image_root, manifest.rejects, len(manifest))
    if missing:
        raise PipelineError(missing)
    if len(manifest) == 0:
        n = len(manifest.rejects)
        raise PipelineError(f"no valid rows: all {n} rows were rejected (see {paths['rejects']})")
    return paths


def _print_summary(manifest: Manifest, paths: dict[str, Path]) -> None:
    typer.echo(f"manifest from {manifest.source}")
    for name in manifest.splits:
        part = manifest.split(name)
        n_images = len(part.unique_images()[0])
        typer.echo(f"  {name:<10} {len(part):>9} rows {n_images:>9} images  -> {paths[name]}")
    typer.echo(f"  {'total':<10} {len(manifest):>9} rows {len(manifest.unique_images()[0]):>9} images")
    image_only = int(manifest.image_only_mask().sum())
    if image_only:
        typer.echo(f"  of which   {image_only:>9} image-only rows (declared unpaired: images without a caption)")
    caption_only = int(manifest.caption_only_mask().sum())
    if caption_only:
        typer.echo(f"  of which   {caption_only:>9} caption-only rows (declared unpaired: captions without an image)")
    typer.echo(f"  rejects    {len(manifest.rejects):>9} rows  -> {paths['rejects']}")
    groups: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for r in manifest.rejects:
        # Group "duplicate sample_id 17" and "duplicate sample_id 40" together; show the first examples
        # with their details (a missing file's reason names the path that was tried).
        detail = re.search(r"\((.*)\)$", r.reason)
        key = re.sub(r"\d+", "N", re.sub(r"\s*\(.*\)$", "", r.reason))
        groups[key] += 1
        shown = examples.setdefault(key, [])
        if len(shown) < 2:
            shown.append(r.source_row + (f": {detail.group(1)}" if detail else ""))
    for key, n in groups.most_common():
        typer.echo(f"    {n:>9}  {key}  (e.g. {'; '.join(examples[key])})")
