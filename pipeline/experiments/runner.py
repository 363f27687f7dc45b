"""Experiment runner: train a sweep's runs (pipeline.experiments.sweep), evaluate them, collect the tables.

What differs between a sweep's commands (distill, adapt, classify) sits in its adapter
(pipeline.experiments.adapters): how one run trains, how trained runs are evaluated, how a table shows them.
Training (pipeline.experiments.training) runs each unique run of the plan in a process of its own, ``jobs`` at
a time, all before any evaluation (so latency is not measured next to other training jobs). Per run,
``<runs_dir>/<name>/experiment.json`` records the overrides, the command, status, error, wall-clock of training
and evaluation and the device (pipeline.experiments.records); ``<command>.log`` holds the trainer's output. The
tables are written by pipeline.experiments.tables.

A run counts as finished when its export and a stage-3 result newer than it exist (a classification run: when its
results.json says both steps are complete), or when it was restored from the sweep's results archive: reruns skip
it.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from pipeline.experiments import tables
from pipeline.experiments.adapters import adapter
from pipeline.experiments.archive import archive_results, restore_results
from pipeline.experiments.records import Log, is_evaluated, is_trained, prune_checkpoints, read_record
from pipeline.experiments.sweep import Plan, Sweep, plan_sweep
from pipeline.experiments.training import train_all


def describe_plan(plan: Plan) -> list[str]:
    """Human-readable plan: per table its cells and run names, dedupe counts and what is already done."""
    lines = []
    for table in plan.tables:
        lines.append(f"table {table.id}: {table.title} ({len(table.rows)} rows x {len(table.seeds)} seeds)")
        for cell in plan.table_cells(table.id):
            if cell.error:
                lines.append(f"  {cell.label} / seed {cell.seed}: INVALID - {cell.error}")
                continue
            run = plan.runs[cell.key]
            rd = plan.run_dir(cell.key)
            state = "done" if is_evaluated(rd) else ("trained" if is_trained(rd) else "to train")
            shared = len({(c.table, c.label) for c in run.cells})
            note = f", shared by {shared} rows" if shared > 1 else ""
            lines.append(f"  {cell.label} / seed {cell.seed}: {run.name} [{state}{note}]")
    valid = [c for c in plan.cells if c.key]
    done = sum(is_evaluated(plan.run_dir(k)) for k in plan.runs)
    trained = sum(is_trained(plan.run_dir(k)) for k in plan.runs)
    lines.append(f"{len(plan.cells)} cells ({len(plan.cells) - len(valid)} invalid) -> {len(plan.runs)} "
                 f"unique runs ({len(valid) - len(plan.runs)} deduplicated); {done} done, {trained - done} "
                 f"trained but "
                 f"not evaluated, {len(plan.runs) - trained} to train; runs in {plan.runs_dir}")
    return lines



# ---- the whole sweep ------------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    plan: Plan
    records: dict[str, dict]  # experiment records by run key
    teacher: Optional[dict]  # the teacher's stage-3 record
    results: Optional[Path]  # the written document (None on a dry run)
    figures: list[Path]
    failed: list[str]  # "table / row / seed: why" for every cell without a result because of an error


def regenerate_command(plan: Plan, table_id: str, results: Path, runs_dir_default: Path,
                       results_default: Path) -> str:
    """The command that rebuilds one table (with the options that change what it shows)."""
    parts = ["clipdistill", "experiments", "--sweep", str(plan.sweep.path), "--only", table_id]
    if plan.runs_dir != runs_dir_default:
        parts += ["--runs-dir", str(plan.runs_dir)]
    if Path(results) != results_default:
        parts += ["--results", str(results)]
    for s in plan.global_sets:
        parts += ["--set", s]
    return " ".join(shlex.quote(p) for p in parts)


def run_sweep(
    sweep: Sweep, runs_dir: str | Path, results: str | Path, figures_dir: str | Path | None, *,
    only: Sequence[str] = (), global_sets: Sequence[str] = (), jobs: int = 1, max_runs: int = 0,
    skip_failed: bool = False, dry_run: bool = False, tables_only: bool = False, train: bool = True,
    prune: bool = False, archive: str | Path | None = None,
    reevaluate: bool = False, log: Log = print,
    defaults: tuple[Path, Path] = (Path("runs/experiments"), Path("docs/RESULTS.md")),
) -> SweepOutcome:
    """Plan, train what is missing, evaluate what is stale and rewrite the chosen tables of ``results``.

    Args:
        figures_dir: where the per-table RSUM bar charts go (None: no figures).
        only: table ids to run and regenerate (default: all).
        global_sets: ``key=value`` overrides applied last to every run (e.g. ``device=cuda``).
        max_runs: train at most this many runs now (0: all); the tables show the rest as not finished.
        skip_failed: do not try runs that failed before again (their errors stay in the tables).
        tables_only: train and evaluate nothing; write the tables from the result files in ``runs_dir``
            (e.g. runs trained and evaluated on another machine, copied without their exports).
        train: False: train nothing, evaluate what is trained (a sweep in progress, another runner training).
        prune: at the end, delete the checkpoints of every finished run of the plan (prune_checkpoints).
        archive: the results archive (default: the sweep's ``archive:``): finished runs are restored from it
            before training and copied into it after evaluation (pipeline.experiments.archive).
        defaults: the CLI's default runs folder and results file (left out of the printed commands).
    """
    plan = plan_sweep(sweep, runs_dir, global_sets, only)
    archive = Path(archive) if archive else sweep.archive
    runs = adapter(sweep.command)
    if archive is not None and not dry_run:
        restore_results(plan, archive, log, runs.result_settings(plan))
    summary = describe_plan(plan)
    if dry_run:
        for line in summary:
            log(line)
        return SweepOutcome(plan, {k: read_record(plan.run_dir(k)) for k in plan.runs}, None, None, [], [])
    log(f"sweep {sweep.path}: {summary[-1]}")
    if train and not tables_only:
        train_all(plan, jobs=jobs, max_runs=max_runs, skip_failed=skip_failed, log=log)
    teacher, records = runs.evaluate(plan, tables_only=tables_only, reevaluate=reevaluate, log=log)

    results = Path(results)
    blocks, figures, failed, rows_by_table = {}, [], [], {}
    read = runs.read_result(plan)
    for table in plan.tables:
        rows_by_table[table.id] = rows = tables.row_stats(plan, table, records, read)
        failed += [f"{table.id} / {r.label} / {e}" for r in rows for e in r.errors]
        command = regenerate_command(plan, table.id, results, *defaults)
        blocks[table.id], fig = runs.section(plan, table, rows, teacher, command,
                                             tables.wall_clock(plan, table, records), figures_dir, results)
        figures += [fig] if fig is not None else []
    tables.update_document(results, blocks, title="Results")
    summary_path = results.parent / "results" / "summary.json"
    data_summary = Path(plan.base.data.manifest_dir) / "summary.json"  # counts per split and style, if the data has them
    data_counts = json.loads(data_summary.read_text()) if data_summary.is_file() else None
    entry = runs.summary_entry(plan, rows_by_table, teacher, data_counts)
    tables.update_summary(summary_path, sweep.name, entry, table_ids={t.id for t in sweep.tables})
    log(f"wrote {len(blocks)} table(s) to {results} and the headline numbers to {summary_path}"
        + (f"; {len(failed)} cell(s) failed" if failed else ""))
    verdicts = Counter(c["verdict"] for checks in (entry.get("claims") or {}).values() for c in checks)
    if verdicts:
        log("claims: " + ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items())))
    if prune:
        prune_checkpoints(plan, log)
    if archive is not None:  # last: the records are final (pruning notes itself in them)
        archive_results(plan, archive, log)
    return SweepOutcome(plan, records, teacher, results, figures, failed)
