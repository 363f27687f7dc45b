"""Classification with an image-text representation head and self-distillation (method.md 4).

clipdistill teacher-tokens -c configs/openmoji-rephead.yaml   # cache image tokens + text embeddings
clipdistill rephead        -c configs/openmoji-rephead.yaml   # step 1: head (text) + linear probe (no text)
clipdistill self-distill   -c configs/openmoji-rephead.yaml   # step 2: student generations, results table
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from pipeline.common import config as cfgio
from pipeline.classify.config import ClassifyConfig
from stages.common import TRUST_UNCHECKED

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML/JSON config (see configs/openmoji-rephead.yaml).")
SetOpt = typer.Option([], "--set", "-s", help="Override a config key: --set few_shot=5 (repeatable).")
NameOpt = typer.Option(None, help="Run name (folder under runs_dir); overrides the config's.")
ResumeOpt = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoints.")
ProgressOpt = typer.Option(True, help="Show progress bars.")
PrintOpt = typer.Option(False, "--print-config", help="Print the resolved config and exit.")


def _load(
    config: Optional[Path], overrides: List[str], name: Optional[str], show: bool = False
) -> Optional[ClassifyConfig]:
    cfg = cfgio.load(ClassifyConfig, config, list(overrides) + ([f"name={name}"] if name else []))
    if show:
        typer.echo(json.dumps(cfgio.to_dict(cfg), indent=2, default=str))
        return None
    return cfg


def teacher_tokens(
    config: Optional[Path] = ConfigOpt,
    overrides: List[str] = SetOpt,
    splits: str = typer.Option(
        "train,val,test", help="Comma-separated splits (missing manifests are skipped)."
    ),
    progress: bool = ProgressOpt,
    trust_unchecked: bool = TRUST_UNCHECKED,
) -> None:
    """Cache the teacher's image token features, caption and class-prompt embeddings (stage 1, optional)."""
    from pipeline.classify.tokens import cache_run_tokens

    cfg = _load(config, overrides, None)
    cache_run_tokens(cfg, [x.strip() for x in splits.split(",") if x.strip()], progress, log=typer.echo)


def _print_teachers(cfg, out: dict) -> None:
    """What step 1 prints: the head's and the probe's accuracy, and where their soft targets are."""
    for part, label in (("head", "with text (head)"), ("probe", "without text (linear probe)")):
        r = out[part]
        shown = {k: r[k] for k in ("val", "test") if r.get(k)}
        typer.echo(
            f"{label}: "
            + ", ".join(f"{k} top-1 {v['top1']:.1f} / top-5 {v['top5']:.1f}" for k, v in shown.items())
            + f" ({r['seconds']:.0f} s)"
        )
    typer.echo(f"soft targets: {Path(cfg.runs_dir) / cfg.name}/{{head,probe}}/targets.h5")


def _print_table(cfg, results: dict) -> None:
    """What a step ending with students prints: the results table and where results.json is."""
    from pipeline.classify.report import classification_table

    typer.echo("\n" + classification_table([results]) + "\n")
    typer.echo(f"results: {Path(cfg.runs_dir) / cfg.name / 'results.json'}")


def _step_command(step: str, report, doc: str):
    """The command that runs ``pipeline.classify.experiment.<step>`` and ``report``s its outcome: rephead,
    self-distill and classify differ only in these."""

    def command(
        config: Optional[Path] = ConfigOpt,
        overrides: List[str] = SetOpt,
        name: Optional[str] = NameOpt,
        resume: bool = ResumeOpt,
        progress: bool = ProgressOpt,
        print_config: bool = PrintOpt,
        trust_unchecked: bool = TRUST_UNCHECKED,
    ) -> None:
        from pipeline.classify import experiment

        cfg = _load(config, overrides, name, print_config)
        if cfg is None:
            return
        report(cfg, getattr(experiment, step)(cfg, resume=resume, progress=progress))

    command.__doc__ = doc
    return command


rephead = _step_command("run_step1", _print_teachers, "Step 1: train the representation head (text queries over "
                        "image tokens) and the text-free probe.")
self_distill = _step_command("run_step2", _print_table, "Step 2: fresh students of the teacher's image "
                             "architecture on soft targets, per generation.")
classify = _step_command("run_both", _print_table, "Steps 1 and 2 in one call (rephead, then self-distill): what a "
                         "classification sweep runs per cell.")


def classify_eval(
    config: Optional[Path] = ConfigOpt,
    overrides: List[str] = SetOpt,
    name: Optional[str] = NameOpt,
    progress: bool = ProgressOpt,
    trust_unchecked: bool = TRUST_UNCHECKED,
) -> None:
    """Measure a finished classify run again from its exports (nothing is retrained): every model's val and test
    metrics with today's code (e.g. balanced top-1 for a run made before it); refused if a stored top-1 does not
    come back."""
    from pipeline.classify import experiment

    cfg = _load(config, overrides, name, False)
    _print_table(cfg, experiment.reevaluate(cfg, progress=progress))


def class_folder(
    path: Path = typer.Argument(..., help="ImageFolder root: <class>/<image> or <split>/<class>/<image>."),
    out: Path = typer.Option(..., help="Output folder for <split>.parquet and rejects.parquet."),
    split_fractions: Optional[str] = typer.Option(
        None,
        help="Without split folders: hash-based splits, e.g. train=0.8,val=0.1,test=0.1 (default: train).",
    ),
) -> None:
    """Manifests for a captionless classification folder (CIFAR/ImageNet exports); caption = class name."""
    from pipeline.data.manifest import write_splits
    from pipeline.data.readers.class_folder import read_class_folder

    manifest = read_class_folder(path, split_fractions)
    written = write_splits(manifest, out)
    for split in manifest.splits:
        part = manifest.split(split)
        n_classes = len(set(part.table.column("label").to_pylist()))
        typer.echo(f"  {split:<6} {len(part):>8} images {n_classes:>5} classes -> {written[split]}")
    typer.echo(f"  rejects {len(manifest.rejects):>7} -> {written['rejects']}")
