"""Stage 2: train a student against the cached teacher targets (never runs the teacher)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pipeline.common import config as cfgio
from stages.common import TRUST_UNCHECKED


def distill(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML/JSON config (see configs/)."),
    overrides: List[str] = typer.Option([], "--set", "-s", help="Override a config key: --set optim.lr=3e-4 (repeatable)."),
    name: Optional[str] = typer.Option(None, help="Run name (folder under runs_dir); overrides the config's."),
    resume: bool = typer.Option(False, "--resume", help="Continue the named run from its last checkpoint."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    verify: bool = typer.Option(False, "--verify", help="Check every cache shard's content in full before "
                                "training, even shards verified before."),
    trust_unchecked: bool = TRUST_UNCHECKED,
) -> None:
    """Distil a student from a teacher-feature cache (method.md section 1); writes runs/<name>/."""
    import os

    from pipeline.distill.trainer import DistillConfig, train
    from pipeline.features.cache.reader import VERIFY_ENV

    if verify:
        os.environ[VERIFY_ENV] = "1"

    sets = list(overrides) + ([f"name={name}"] if name else [])
    cfg = cfgio.load(DistillConfig, config, sets)
    if print_config:
        import json

        typer.echo(json.dumps(cfgio.to_dict(cfg), indent=2, default=str))
        return
    result = train(cfg, resume=resume, progress=progress)
    if result.export_path is not None:
        typer.echo(
            f"done in {result.seconds / 60:.1f} min, {result.steps} steps; best val RSUM {result.best_rsum:.1f} "
            f"(epoch {result.best_epoch + 1}); student export: {result.export_path}"
        )
