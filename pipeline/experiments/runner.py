"""Experiment runner: train a sweep's runs (pipeline.experiments.sweep), evaluate them, collect the tables.

Each unique run of the plan is trained by a ``clipdistill distill`` (or ``adapt``, or ``classify``: the sweep's command)
subprocess (so ``jobs`` of them can share a big machine; an interrupted one is resumed with ``--resume``), then
evaluated in this process with pipeline.retrieval.evaluate once all training is done (so latency is not measured
next to other training jobs). An export row's model is copied in instead of trained. Per run,
``<runs_dir>/<name>/experiment.json`` records the overrides, the command, status, error, wall-clock of training
and evaluation and the device; ``<command>.log`` holds the trainer's output. The tables are written by
pipeline.experiments.tables.

A run counts as finished when its export and a stage-3 result newer than it exist (a classification run: when its
results.json says both steps are complete): reruns skip it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from pipeline.experiments import classify_tables, tables
from pipeline.common.errors import PipelineError
from pipeline.experiments.sweep import EVAL_DIR, EvalSection, Plan, PlannedRun, Sweep, plan_sweep
from pipeline.common import io
from pipeline.common import paths

EXPERIMENT_FORMAT = "clipdistill-experiment/1"
RECORD_FILE = "experiment.json"
EXPORT = Path("export") / "student.pt"
CLASSIFY_RESULTS = "results.json"  # a classification run's every number (pipeline.classify.experiment)
TEACHER_DIR = "_teacher"

Log = Callable[[str], None]


# ---- run records -------------------------------------------------------------------------------


def read_record(run_dir: Path) -> dict:
    path = Path(run_dir) / RECORD_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def write_record(run_dir: Path, record: dict) -> None:
    io.write_json(run_dir / RECORD_FILE, record)


def classification_results(run_dir: Path) -> Optional[dict]:
    """A classification run's results.json once both of its steps are complete (it holds its own test numbers)."""
    try:
        results = json.loads((Path(run_dir) / CLASSIFY_RESULTS).read_text())
    except (OSError, ValueError):
        return None
    return results if results.get("complete") else None


def is_trained(run_dir: Path) -> bool:
    return (Path(run_dir) / EXPORT).is_file() or classification_results(run_dir) is not None


def is_evaluated(run_dir: Path) -> bool:
    """The export and an evaluation result newer than it exist (what a rerun skips); a classification run
    evaluates itself, so a complete one is evaluated."""
    if classification_results(run_dir) is not None:
        return True
    export, result = Path(run_dir) / EXPORT, Path(run_dir) / EVAL_DIR / "result.json"
    return export.is_file() and result.is_file() and result.stat().st_mtime > export.stat().st_mtime


def prune_checkpoints(plan: Plan, log: Log = print) -> tuple[int, int]:
    """Delete the checkpoints of the plan's finished runs (exported, evaluated, status done); returns (runs, bytes).

    Checkpoints only serve to resume training, and they are most of a run's disk (the weights plus AdamW's two
    moments: 0.3 of 0.5 GB for the default student), so a sweep of a hundred runs fills a disk with them. A
    run that is not finished keeps its checkpoints so that it can still resume; the record notes the pruning.
    """
    runs, freed = 0, 0
    for key in plan.runs:
        run_dir = plan.run_dir(key)
        ckpts = _checkpoint_dirs(run_dir)
        record = read_record(run_dir)
        if not ckpts or record.get("status") != "done" or not is_evaluated(run_dir):
            continue
        size = sum(f.stat().st_size for d in ckpts for f in d.rglob("*") if f.is_file())
        for d in ckpts:
            shutil.rmtree(d)
        write_record(run_dir, {**record, "checkpoints_pruned": True})
        runs, freed = runs + 1, freed + size
    log(f"pruned the checkpoints of {runs} finished run(s): {freed / 2**30:.2f} GiB freed")
    return runs, freed


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every checkpoints folder of a run: its own, or (a classification run) one per head, fold and generation."""
    return sorted(p.parent for p in Path(run_dir).glob(f"**/{paths.last_checkpoint('').as_posix()}"))


def log_file(plan: Plan) -> str:
    return f"{plan.sweep.command}.log"


def run_command(plan: Plan, run: PlannedRun, resume: bool, python: Sequence[str] | None = None) -> list[str]:
    """The ``clipdistill distill|adapt`` call that trains ``run`` (``python``: what replaces ``clipdistill``)."""
    exe = list(python) if python else ["clipdistill"]
    cmd = [*exe, plan.sweep.command, "--config", str(plan.sweep.base_config)]
    for s in run.sets:
        cmd += ["--set", s]
    cmd += ["--set", f"runs_dir={plan.runs_dir}", "--name", run.name, "--no-progress"]
    return cmd + (["--resume"] if resume else [])


def _last_error(log: Path) -> str:
    """The trainer's one-line ``error:`` message, else the last line of its output (a traceback's)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no output"
    errors = [ln for ln in lines if ln.startswith("error:")]
    line = errors[-1][len("error:"):].strip() if errors else (lines[-1] if lines else "no output")
    return line[:500]


def _device_of(config: Any) -> str:
    import torch

    from pipeline.common.distributed import resolve_device
    from pipeline.retrieval.evaluate import device_description

    return device_description(torch.device(resolve_device(config.device)))


def _child_env() -> dict[str, str]:
    """This process's environment with this package's root first on PYTHONPATH, so the trainer runs
    the same code as the runner whatever the working directory holds."""
    import pipeline

    root = str(Path(pipeline.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def copy_export(plan: Plan, run: PlannedRun) -> dict:
    """An export row: the model is copied into its run folder (again when the source is newer), not trained."""
    import shutil

    run_dir = plan.run_dir(run.key)
    source, target = Path(run.export), run_dir / EXPORT
    record = {**read_record(run_dir), "format": EXPERIMENT_FORMAT, "key": run.key, "name": run.name,
              "export": str(source), "command": f"(evaluated as it is: {source})", "sets": [],
              "uses": [{"table": c.table, "label": c.label, "seed": c.seed} for c in run.cells]}
    if not source.is_file():
        record.update(status="failed", error=f"export {source} not found")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        record.update(status="trained", error=None, train_seconds=0.0)
    write_record(run_dir, record)
    return record


def export_is_stale(plan: Plan, run: PlannedRun) -> bool:
    target = plan.run_dir(run.key) / EXPORT
    source = Path(run.export)
    return not target.is_file() or (source.is_file() and source.stat().st_mtime > target.stat().st_mtime)


def train_run(plan: Plan, run: PlannedRun, device: str) -> dict:
    """Train one run in a subprocess; returns (and writes) its updated record. Never raises for a run
    that fails: the error goes into the record."""
    if run.export is not None:
        return copy_export(plan, run)
    run_dir = plan.run_dir(run.key)
    record = read_record(run_dir)
    resume = bool(_checkpoint_dirs(run_dir))
    cmd = run_command(plan, run, resume, [sys.executable, "-m", "stages.cli"])
    shown = " ".join(shlex.quote(c) for c in run_command(plan, run, resume))
    record.update(format=EXPERIMENT_FORMAT, key=run.key, name=run.name,
                  base_config=str(plan.sweep.base_config), sets=run.sets, command=shown, status="training",
                  error=None, device=device, host=platform.node(), started=time.strftime("%Y-%m-%dT%H:%M:%S"),
                  uses=[{"table": c.table, "label": c.label, "seed": c.seed} for c in run.cells])
    write_record(run_dir, record)
    start = time.perf_counter()
    with open(run_dir / log_file(plan), "ab") as log:
        log.write(f"\n$ {shown}\n".encode())
        log.flush()
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=_child_env())
    seconds = time.perf_counter() - start
    # Wall-clock adds up over attempts (a resumed run's total is what it cost).
    record["train_seconds"] = float(record.get("train_seconds") or 0.0) + seconds
    record["attempts"] = int(record.get("attempts") or 0) + 1
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if code == 0 and is_trained(run_dir):
        record["status"] = "trained"
    else:
        record["status"] = "failed"
        record["error"] = f"{plan.sweep.command} exited with {code}: {_last_error(run_dir / log_file(plan))}"
    write_record(run_dir, record)
    return record


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _uses(run: PlannedRun) -> str:
    first = run.cells[0]
    more = len({c.table for c in run.cells}) - 1
    return f"{first.table}: {first.label}, seed {first.seed}" + (f"; +{more} other table(s)" if more else "")


def train_all(plan: Plan, jobs: int = 1, max_runs: int = 0, skip_failed: bool = False,
              log: Log = print) -> dict[str, dict]:
    """Train every planned run without an export, ``jobs`` at a time; returns records by key.

    Runs that failed before are tried again (resumed from their last checkpoint if they have one)
    unless ``skip_failed``, which keeps their recorded error instead.
    """
    if jobs < 1:
        raise PipelineError(f"--jobs must be at least 1, got {jobs}")
    todo = [r for r in plan.runs.values()
            if (export_is_stale(plan, r) if r.export is not None else not is_trained(plan.run_dir(r.key)))]
    done = len(plan.runs) - len(todo)
    if done:
        log(f"{done} of {len(plan.runs)} runs already trained: skipped")
    if skip_failed:
        failed = [r for r in todo if read_record(plan.run_dir(r.key)).get("status") == "failed"]
        if failed:
            log(f"--skip-failed: {len(failed)} run(s) that failed before not tried again")
            todo = [r for r in todo if r not in failed]
    if max_runs and len(todo) > max_runs:
        log(f"--max-runs {max_runs}: training {max_runs} of the {len(todo)} runs left")
        todo = todo[:max_runs]
    records: dict[str, dict] = {}
    if not todo:
        return records
    device = _device_of(plan.base)
    lock, finished, durations, t0 = threading.Lock(), [0], [], time.perf_counter()
    total = len(todo)

    def one(i: int, run: PlannedRun) -> dict:
        with lock:
            log(f"[{i}/{total}] train {run.name} ({_uses(run)})")
        try:
            return train_run(plan, run, device)
        except Exception as exc:  # e.g. a full disk while writing the log: record it, let the others go on
            record = {**read_record(plan.run_dir(run.key)), "status": "failed",
                      "error": f"runner: {type(exc).__name__}: {exc}"}
            write_record(plan.run_dir(run.key), record)
            return record

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(one, i + 1, r): r for i, r in enumerate(todo)}
        for fut in as_completed(futures):
            run = futures[fut]
            rec = fut.result()
            records[run.key] = rec
            with lock:
                finished[0] += 1
                left = total - finished[0]
                if rec["status"] != "failed":
                    durations.append(float(rec.get("train_seconds") or 0.0))
                # Runs are alike, so the mean successful run over `jobs` parallel slots estimates the rest.
                eta = _fmt_time(sum(durations) / len(durations) * left / jobs) if durations else "unknown"
                took = _fmt_time(time.perf_counter() - t0)
                if rec["status"] == "failed":
                    log(f"[{finished[0]}/{total}] FAILED {run.name}: {rec['error']}")
                else:
                    log(f"[{finished[0]}/{total}] trained {run.name} in {_fmt_time(durations[-1])}; "
                        f"{left} left, ETA {eta} ({took} elapsed)")
    return records


# ---- evaluation -------------------------------------------------------------------------------


@dataclass
class EvalContext:
    manifest: Any
    cache: Any
    device: str
    settings: EvalSection


def open_eval(plan: Plan) -> EvalContext:
    from pipeline.features.cache import FeatureCache
    from pipeline.common.distributed import resolve_device
    from pipeline.data.manifest import Manifest

    split = plan.sweep.eval.split
    manifest_path = paths.manifest_path(plan.base.data.manifest_dir, split)
    cache_dir = paths.cache_split_dir(plan.teacher_cache_dir, split) if plan.teacher_cache_dir else None
    if not manifest_path.is_file() or (cache_dir is not None and not cache_dir.is_dir()):
        raise PipelineError(f"evaluation needs {manifest_path}" + (
            f" and a {split} cache in {cache_dir}; run `make teacher-features`" if cache_dir else ""))
    manifest = Manifest.read(manifest_path)
    # no teacher cache (an adapt sweep without eval.cache_dir): students only, no teacher row
    cache = FeatureCache(cache_dir, expect_manifest_hash=manifest.content_hash) if cache_dir else None
    return EvalContext(manifest, cache, resolve_device(plan.base.device), plan.sweep.eval)


def _speed(ctx: EvalContext):
    from pipeline.retrieval.evaluate import SpeedSettings

    return SpeedSettings(repeats=ctx.settings.latency_repeats) if ctx.settings.latency_repeats > 0 else None


def evaluate_teacher(plan: Plan, ctx: EvalContext, log: Log = print, measure_speed: bool = True) -> Optional[dict]:
    """The teacher's record from its cache (as `clipdistill eval`), evaluated once per runs folder, plus
    its FLOPs per item when the cache's teacher is the offline ``lit`` one. ``measure_speed=False`` leaves
    latency out (tables written on another machine than the students' evaluation). None without a cache."""
    from pipeline.retrieval.evaluate import evaluate_teacher_cache, is_fresh, read_result, safe_name, teacher_settings

    if ctx.cache is None:
        return None
    s = ctx.settings
    out = plan.runs_dir / TEACHER_DIR / safe_name(f"teacher-{ctx.cache.meta.teacher_name}")
    settings = teacher_settings(s.split, s.index, s.max_captions_per_image, ctx.manifest, s.teacher_spec)
    speed = _speed(ctx) if measure_speed else None
    if is_fresh(out, ctx.cache.shard_paths, settings) and (
            (read_result(out).get("speed") is not None) == (speed is not None and bool(s.teacher_spec))):
        record = read_result(out)
    else:
        start = time.perf_counter()
        evaluate_teacher_cache(ctx.cache, ctx.manifest, s.index, teacher=s.teacher_spec, split=s.split,
                               max_captions_per_image=s.max_captions_per_image, out_dir=out, name=out.name,
                               device=ctx.device, speed=speed)
        record = read_result(out)
        took = _fmt_time(time.perf_counter() - start)
        log(f"teacher {out.name}: RSUM {record['metrics']['rsum']:.1f} ({took})")
    if ctx.cache.meta.teacher_name == "lit":
        from pipeline.students import lit_teacher_cost

        record["flops"] = lit_teacher_cost(embed_dim=ctx.cache.width)["flops"]
    elif (s.teacher_spec or "").startswith("dual:"):  # a dual-encoder teacher is measured like a student
        from pipeline.students import flops_per_item
        from pipeline.teachers import load_teacher

        record["flops"] = flops_per_item(load_teacher(s.teacher_spec).model)
    return record


def evaluate_run(plan: Plan, key: str, ctx: EvalContext) -> tuple[dict, bool]:
    """Stage-3 result of one trained run, evaluated unless a fresh one exists (same settings, newer than
    the export); updates its experiment record. Returns (record, whether it was evaluated now)."""
    from pipeline.retrieval.evaluate import evaluate_student, foreign_export_reason, is_fresh, read_result, student_settings
    from pipeline.students import flops_per_item, load_student

    run = plan.runs[key]
    run_dir = plan.run_dir(key)
    export, out = run_dir / EXPORT, run_dir / EVAL_DIR
    s = ctx.settings
    record = read_record(run_dir)
    settings = student_settings(s.split, s.index, s.max_captions_per_image, ctx.manifest, ctx.cache)
    if is_fresh(out, [export], settings) and record.get("status") == "done":
        return record, False
    foreign = foreign_export_reason(export, ctx.cache) if ctx.cache is not None else None
    if foreign:  # e.g. the cache was rebuilt with another teacher since this run trained
        record.update(status="skipped", error=foreign)
        write_record(run_dir, record)
        return record, True
    start = time.perf_counter()
    try:
        evaluate_student(export, ctx.manifest, ctx.cache, s.index, split=s.split,
                         max_captions_per_image=s.max_captions_per_image, out_dir=out, name=run.name,
                         device=ctx.device, batch_size=s.batch_size, workers=s.workers, speed=_speed(ctx))
        flops = flops_per_item(load_student(export, "cpu").model)
    except PipelineError as exc:
        record.update(status="failed", error=f"evaluation: {exc}")
        write_record(run_dir, record)
        return record, True
    result = read_result(out)
    record.update(status="done", error=None, eval_seconds=time.perf_counter() - start, flops=flops,
                  eval_device=result.get("device"))
    record.setdefault("name", run.name)
    write_record(run_dir, record)
    return record, True


def evaluate_all(plan: Plan, ctx: EvalContext, log: Log = print) -> dict[str, dict]:
    """Evaluate every trained run that has no fresh result; returns the records of all planned runs."""
    trained = [k for k in plan.runs if is_trained(plan.run_dir(k))]
    skipped = 0
    for key in trained:
        rec, now = evaluate_run(plan, key, ctx)
        name = plan.runs[key].name
        if not now:
            skipped += 1
            continue
        if rec["status"] == "failed":
            log(f"eval {name} FAILED: {rec['error']}")
        elif rec["status"] == "skipped":
            log(f"eval {name} skipped: {rec['error']}")
        else:
            m = json.loads((plan.eval_dir(key) / "result.json").read_text())["metrics"]
            log(f"eval {name}: RSUM {m['rsum']:.1f} ({_fmt_time(rec['eval_seconds'])})")
    if skipped:
        log(f"{skipped} of {len(trained)} trained runs already evaluated: skipped")
    return {key: read_record(plan.run_dir(key)) for key in plan.runs}


def mark_classification_runs(plan: Plan) -> dict[str, dict]:
    """A classification run with a complete results.json is done (it evaluated itself); returns every record."""
    records = {}
    for key in plan.runs:
        run_dir = plan.run_dir(key)
        record = read_record(run_dir)
        if record.get("status") != "done" and classification_results(run_dir) is not None:
            record.update(status="done", error=None, eval_seconds=0.0)
            write_record(run_dir, record)
        records[key] = record
    return records


def reevaluate_classification_runs(plan: Plan, records: dict[str, dict], log: Log) -> None:
    """Measure every finished classification run of the plan again from its exports, with today's metrics
    (pipeline.classify.experiment.reevaluate); a run whose exports do not reproduce it keeps its numbers."""
    from pipeline.classify.config import ClassifyConfig
    from pipeline.classify.experiment import measured_today, reevaluate
    from pipeline.common import config as cfgio

    done = [key for key in plan.runs if records.get(key, {}).get("status") == "done"]
    for n, key in enumerate(done, 1):
        run_dir = plan.run_dir(key)
        if measured_today(run_dir):
            log(f"[{n}/{len(done)}] {run_dir.name} already has today's metrics")
            continue
        cfg = dataclasses.replace(cfgio.load(ClassifyConfig, run_dir / "config.json"),
                                  runs_dir=str(run_dir.parent), name=run_dir.name)
        try:
            reevaluate(cfg, progress=False)
            log(f"[{n}/{len(done)}] re-evaluated {run_dir.name}")
        except PipelineError as exc:
            log(f"[{n}/{len(done)}] {run_dir.name} not re-evaluated: {exc}")


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
    skip_failed: bool = False, dry_run: bool = False, tables_only: bool = False, prune: bool = False,
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
        prune: at the end, delete the checkpoints of every finished run of the plan (prune_checkpoints).
        defaults: the CLI's default runs folder and results file (left out of the printed commands).
    """
    plan = plan_sweep(sweep, runs_dir, global_sets, only)
    summary = describe_plan(plan)
    if dry_run:
        for line in summary:
            log(line)
        return SweepOutcome(plan, {k: read_record(plan.run_dir(k)) for k in plan.runs}, None, None, [], [])
    log(f"sweep {sweep.path}: {summary[-1]}")
    classify = sweep.command == "classify"
    ctx = None
    if not tables_only:
        train_all(plan, jobs=jobs, max_runs=max_runs, skip_failed=skip_failed, log=log)
        ctx = None if classify else open_eval(plan)
    if classify:  # each run evaluated itself on its test split (its results.json); there is no teacher cache
        teacher, records = None, mark_classification_runs(plan)
        if reevaluate:
            reevaluate_classification_runs(plan, records, log)
    else:
        teacher = evaluate_teacher(plan, ctx or open_eval(plan), log, measure_speed=not tables_only)
        records = (evaluate_all(plan, ctx, log) if ctx is not None
                   else {key: read_record(plan.run_dir(key)) for key in plan.runs})

    results = Path(results)
    blocks, figures, failed, rows_by_table = {}, [], [], {}
    for table in plan.tables:
        read = (lambda key: classification_results(plan.run_dir(key))) if classify else None
        rows_by_table[table.id] = rows = tables.row_stats(plan, table, records, read)
        failed += [f"{table.id} / {r.label} / {e}" for r in rows for e in r.errors]
        command = regenerate_command(plan, table.id, results, *defaults)
        if classify:
            blocks[table.id] = classify_tables.section(table, rows, command, tables.wall_clock(plan, table, records))
            continue
        link = None
        if figures_dir is not None:
            fig = tables.bar_figure(table, rows, teacher, Path(figures_dir) / f"{sweep.name}-{table.id}.png")
            if fig is not None:
                figures.append(fig)
                link = tables.relative_link(fig, results)
        blocks[table.id] = tables.section(table, rows, teacher, command,
                                          tables.wall_clock(plan, table, records), link)
    tables.update_document(results, blocks, title="Results")
    summary_path = results.parent / "results" / "summary.json"
    data_summary = Path(plan.base.data.manifest_dir) / "summary.json"  # counts per split and style, if the data has them
    data_counts = json.loads(data_summary.read_text()) if data_summary.is_file() else None
    entry = (classify_tables.summary_entry(plan, rows_by_table) if classify
             else tables.summary_entry(plan, rows_by_table, teacher, data_counts))
    tables.update_summary(summary_path, sweep.name, entry, table_ids={t.id for t in sweep.tables})
    log(f"wrote {len(blocks)} table(s) to {results} and the headline numbers to {summary_path}"
        + (f"; {len(failed)} cell(s) failed" if failed else ""))
    if prune:
        prune_checkpoints(plan, log)
    return SweepOutcome(plan, records, teacher, results, figures, failed)
