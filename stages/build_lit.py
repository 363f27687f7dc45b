"""Stage 0b: train the offline LiT teacher's heads on a dataset's train split (`make lit-teacher`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.common import TRUST_UNCHECKED, resolve_device
from pipeline.common import paths


def build_lit(
    manifest: Path = typer.Option(..., help="Train split manifest (parquet) to fit the heads on."),
    out: Path = typer.Option(..., help="Checkpoint to write (e.g. artifacts/teachers/lit-openmoji.pt)."),
    val_manifest: Optional[Path] = typer.Option(
        None, help="Manifest for choosing the epoch and reporting R@K (default: sibling val.parquet if it "
        "exists, else 10% of the train images held out)."
    ),
    width: int = typer.Option(512, help="Embedding width of both heads."),
    image_size: int = typer.Option(
        224, min=32, help="Pixels the image tower reads (224: its own; 128 is 3x faster, the demo's choice)."),
    epochs: int = typer.Option(60, help="Head-training epochs over the cached tower features (best kept)."),
    lr: float = typer.Option(1e-3, help="AdamW peak learning rate (cosine decay)."),
    batch_size: int = typer.Option(256, help="Pairs per contrastive batch."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    workers: int = typer.Option(2, help="DataLoader workers decoding images for the image tower."),
    seed: int = typer.Option(0, help="Seed for head init, batch order and the held-out split."),
    trust_unchecked: bool = TRUST_UNCHECKED,
) -> None:
    """Encode the train split with the frozen towers (cached next to --out) and train the linear heads."""
    from pipeline.distill.lit_heads import feature_cache_path, train_lit_heads

    sibling_val = paths.manifest_path(manifest.parent, "val")
    if val_manifest is None and sibling_val.exists() and manifest.name != sibling_val.name:
        val_manifest = sibling_val
    s = train_lit_heads(
        manifest, out, val_manifest=val_manifest, width=width, epochs=epochs, lr=lr, batch_size=batch_size,
        seed=seed, num_workers=workers, device=resolve_device(device), image_size=image_size,
    )
    typer.echo(
        f"LiT heads: {s['train_pairs']} pairs / {s['train_images']} images at {s['image_size']} px, width {s['width']}, "
        f"best epoch {s['best_epoch']}/{s['epochs']}, temperature {s['temperature']:.4f}; "
        f"{s['image_failures']} images failed to decode"
    )
    if s["val"] is not None:
        v = s["val"]
        typer.echo(
            f"val ({s['val_source']}, {s['val_images']} images, {s['val_pairs']} captions): "
            f"image->text R@1/5/10 {v['i2t_r1']:.1f}/{v['i2t_r5']:.1f}/{v['i2t_r10']:.1f}, "
            f"text->image R@1/5/10 {v['t2i_r1']:.1f}/{v['t2i_r5']:.1f}/{v['t2i_r10']:.1f}, "
            f"RSUM {v['rsum']:.1f}"
        )
    t = s["time_s"]
    typer.echo(
        f"tower features {s['feature_cache']} ({feature_cache_path(out, 'train').name}) "
        f"in {t['features']:.1f}s, "
        f"head training {t['training']:.1f}s -> {out} (+ {out.with_suffix('.json').name})"
    )
