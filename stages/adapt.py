"""Adapt a pretrained dual encoder to a domain with few captions (method.md 3); writes runs/<name>/."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pipeline.common import config as cfgio
from stages.common import TRUST_UNCHECKED


def adapt(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="YAML/JSON config (see configs/openmoji-adapt.yaml)."),
    overrides: List[str] = typer.Option(
        [], "--set", "-s",
        help="Override a config key: --set mode=supervised --set labelled_fraction=0.1 (repeatable)."),
    name: Optional[str] = typer.Option(
        None, help="Run name (folder under runs_dir); overrides the config's."),
    resume: bool = typer.Option(False, "--resume", help="Continue the named run from its last checkpoint."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    trust_unchecked: bool = TRUST_UNCHECKED,
) -> None:
    """Fine-tune a start model (student export, lit teacher, open_clip model) on a labelled fraction of the
    training pairs: supervised only, or with an EMA mean teacher's consistency loss on the rest."""
    from pipeline.adapt.trainer import AdaptConfig, train

    sets = list(overrides) + ([f"name={name}"] if name else [])
    cfg = cfgio.load(AdaptConfig, config, sets)
    if print_config:
        import json

        typer.echo(json.dumps(cfgio.to_dict(cfg), indent=2, default=str))
        return
    result = train(cfg, resume=resume, progress=progress)
    typer.echo(
        f"done in {result.seconds / 60:.1f} min, {result.steps} steps; best val RSUM {result.best_rsum:.1f} "
        f"(epoch {result.best_epoch + 1}); export: {result.export_path}"
    )
