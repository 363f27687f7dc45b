"""Run a sweep of distillation experiments from one cache and collect their stage-3 results into tables."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from stages.common import TRUST_UNCHECKED


RUNS_DIR, RESULTS = Path("runs/experiments"), Path("docs/RESULTS.md")


def experiments(
    sweep: Path = typer.Option(Path("sweeps/openmoji.yaml"), "--sweep",
                               help="Sweep file (YAML): base config, overrides, tables of rows x seeds."),
    only: List[str] = typer.Option([], "--only", help="Run and regenerate only this table id (repeatable)."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Training runs at a time (each in a process of "
                             "its own; on one GPU they share it)."),
    runs_dir: Path = typer.Option(RUNS_DIR, "--runs-dir", help="Folder of the runs (one per unique config)."),
    results: Path = typer.Option(RESULTS, "--results", help="Markdown document whose table sections are "
                                 "regenerated; text outside the markers is kept."),
    figures_dir: Optional[Path] = typer.Option(None, "--figures-dir", help="Where the RSUM bar charts go "
                                               "(default: a results/ folder next to --results)."),
    figures: bool = typer.Option(True, help="Write a bar chart per table (--no-figures: tables only)."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Print the plan (runs, deduplication, what is done) and exit."),
    overrides: List[str] = typer.Option([], "--set", "-s", help="Override applied to every run, last: "
                                        "--set device=cuda (repeatable)."),
    max_runs: int = typer.Option(0, "--max-runs", help="Train at most this many runs now (0: all)."),
    skip_failed: bool = typer.Option(False, "--skip-failed", help="Do not try runs that failed before again "
                                     "(default: retry them, resuming from their last checkpoint)."),
    tables_only: bool = typer.Option(False, "--tables-only", help="Train and evaluate nothing: write the "
                                     "tables from the results already in --runs-dir (e.g. copied from a GPU "
                                     "machine without the exports)."),
    no_train: bool = typer.Option(False, "--no-train", help="Train nothing: evaluate the runs already trained "
                                  "and write the tables, the rest shown as not finished (a sweep in progress, "
                                  "while another runner trains it)."),
    reevaluate: bool = typer.Option(False, "--reevaluate", help="Classification sweeps: measure every finished "
                                    "run again from its exports before the tables (nothing retrained; new "
                                    "metrics such as balanced top-1 for older runs)."),
    prune: bool = typer.Option(False, "--prune-checkpoints", help="At the end, delete the checkpoints of every "
                               "finished run of the sweep (they only serve to resume training; about 0.3 GB "
                               "a run). The export, metrics and results stay; unfinished runs keep theirs."),
    archive: Optional[Path] = typer.Option(None, "--archive", help="Results archive (default: the sweep's "
                                           "archive:): finished runs are restored from it instead of trained "
                                           "again, and copied into it once evaluated (a few KB a run)."),
    trust_unchecked: bool = TRUST_UNCHECKED,
) -> None:
    """Train every (row, seed) of a sweep once (identical configs shared across tables; finished runs are
    skipped), evaluate them on the test split next to the teacher and write the tables to --results."""
    from pipeline.experiments.runner import run_sweep
    from pipeline.experiments.sweep import load_sweep

    fig_dir = (figures_dir or results.parent / "results") if figures else None
    run_sweep(load_sweep(sweep), runs_dir, results, fig_dir, only=only, global_sets=overrides, jobs=jobs,
              max_runs=max_runs, skip_failed=skip_failed, dry_run=dry_run, tables_only=tables_only,
              train=not no_train, prune=prune, archive=archive, reevaluate=reevaluate, log=typer.echo,
              defaults=(RUNS_DIR, RESULTS))
