"""The runner's adapters for retrieval runs (``distill``, ``adapt``): stage 3 on the sweep's test split next
to the teacher, once all training is done (so latency is not measured next to other training jobs)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.common import paths
from pipeline.common.errors import PipelineError
from pipeline.experiments import tables
from pipeline.experiments.adapters import CommandAdapter, Log
from pipeline.experiments.records import (
    EXPORT, fmt_time, is_results_only, is_trained, read_record, record_val_rsum, write_record,
)
from pipeline.experiments.sweep import EVAL_DIR, EvalSection, Plan, SweepTable

TEACHER_DIR = "_teacher"


@dataclass
class EvalContext:
    manifest: Any
    cache: Any
    device: str
    settings: EvalSection

    def options(self, measure_speed: bool = True):
        from pipeline.retrieval.evaluate import SpeedSettings
        from pipeline.retrieval.exports import EvalOptions

        s = self.settings
        speed = SpeedSettings(repeats=s.latency_repeats) if measure_speed and s.latency_repeats > 0 else None
        return EvalOptions(s.split, s.index, s.max_captions_per_image, self.device, s.batch_size, s.workers,
                           speed, s.teacher_spec)


def open_eval(plan: Plan) -> EvalContext:
    from pipeline.common.distributed import resolve_device
    from pipeline.data.manifest import Manifest
    from pipeline.features.cache import FeatureCache

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


def teacher_flops(ctx: EvalContext) -> Optional[dict]:
    """The teacher's FLOPs per item where they can be known: the offline ``lit`` teacher from its cache's width,
    a dual-encoder teacher (a student architecture) measured like a student; None otherwise."""
    spec = ctx.settings.teacher_spec or ""
    if ctx.cache.meta.teacher_name == "lit":
        from pipeline.students import lit_teacher_cost

        return lit_teacher_cost(embed_dim=ctx.cache.width)["flops"]
    if spec.startswith("dual:"):
        from pipeline.students import flops_per_item
        from pipeline.teachers import load_teacher

        return flops_per_item(load_teacher(spec).model)
    return None


def evaluate_teacher(plan: Plan, ctx: EvalContext, log: Log = print, measure_speed: bool = True) -> Optional[dict]:
    """The teacher's record from its cache (as `clipdistill eval`), evaluated once per runs folder, plus its
    FLOPs per item (teacher_flops). ``measure_speed=False`` leaves latency out (tables written on another machine
    than the students' evaluation). None without a cache."""
    from pipeline.retrieval.evaluate import safe_name
    from pipeline.retrieval.exports import teacher_unless_fresh

    if ctx.cache is None:
        return None
    out = plan.runs_dir / TEACHER_DIR / safe_name(f"teacher-{ctx.cache.meta.teacher_name}")
    opts = ctx.options(measure_speed)
    start = time.perf_counter()
    # a stored result without the latency this run asks for (or with latency it does not) is evaluated again
    record, now = teacher_unless_fresh(ctx.cache, ctx.manifest, opts, out,
                                       require_speed=opts.speed is not None and bool(opts.teacher_spec))
    if now:
        log(f"teacher {out.name}: RSUM {record['metrics']['rsum']:.1f} ({fmt_time(time.perf_counter() - start)})")
    flops = teacher_flops(ctx)
    if flops is not None:
        record["flops"] = flops
    return record


def evaluate_run(plan: Plan, key: str, ctx: EvalContext) -> tuple[dict, bool]:
    """Stage-3 result of one trained run, evaluated unless a fresh one exists (same settings, newer than
    the export); updates its experiment record. Returns (record, whether it was evaluated now)."""
    from pipeline.distill.trainer import export_reads_teacher
    from pipeline.retrieval.exports import ForeignExport, student_unless_fresh
    from pipeline.students import flops_per_item, load_student

    run, run_dir = plan.runs[key], plan.run_dir(key)
    export = run_dir / EXPORT
    record = read_record(run_dir)
    start = time.perf_counter()
    try:
        result, now = student_unless_fresh(export, ctx.manifest, ctx.cache, ctx.options(), run_dir / EVAL_DIR,
                                           run.name, force=record.get("status") != "done", skip_foreign=True,
                                           reads_teacher=export_reads_teacher)
        if not now:
            return record, False
        flops = flops_per_item(load_student(export, "cpu").model)
    except ForeignExport as exc:  # e.g. the cache was rebuilt with another teacher since this run trained
        record.update(status="skipped", error=str(exc))
        write_record(run_dir, record)
        return record, True
    except PipelineError as exc:
        record.update(status="failed", error=f"evaluation: {exc}")
        write_record(run_dir, record)
        return record, True
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
        if is_results_only(plan.run_dir(key)):  # restored from an archive: no export to evaluate
            skipped += 1
            continue
        rec, now = evaluate_run(plan, key, ctx)
        if now or "best_val_rsum" not in rec:  # a new export, or a record from before records kept it
            record_val_rsum(plan.run_dir(key))
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
            log(f"eval {name}: RSUM {m['rsum']:.1f} ({fmt_time(rec['eval_seconds'])})")
    if skipped:
        log(f"{skipped} of {len(trained)} trained runs already evaluated: skipped")
    return {key: read_record(plan.run_dir(key)) for key in plan.runs}


class RetrievalRuns(CommandAdapter):
    """Runs that export a dual encoder: evaluated by stage 3 next to the teacher's cache."""

    def evaluate(self, plan: Plan, *, tables_only: bool, reevaluate: bool,
                 log: Log) -> tuple[Optional[dict], dict[str, dict]]:
        if tables_only:  # nothing evaluated: the results already in the runs folder
            teacher = evaluate_teacher(plan, open_eval(plan), log, measure_speed=False)
            return teacher, {key: read_record(plan.run_dir(key)) for key in plan.runs}
        ctx = open_eval(plan)
        return evaluate_teacher(plan, ctx, log), evaluate_all(plan, ctx, log)

    def result_settings(self, plan: Plan) -> Optional[dict]:
        from pipeline.retrieval.evaluate import student_settings

        ctx = open_eval(plan)
        return student_settings(ctx.settings.split, ctx.settings.index, ctx.settings.max_captions_per_image,
                                ctx.manifest, ctx.cache)

    def section(self, plan: Plan, table: SweepTable, rows: list, teacher: Optional[dict], command: str,
                wall: str, figures_dir: Optional[Path], results: Path) -> tuple[str, Optional[Path]]:
        fig = link = None
        if figures_dir is not None:
            fig = tables.bar_figure(table, rows, teacher, Path(figures_dir) / f"{plan.sweep.name}-{table.id}.png")
            link = tables.relative_link(fig, results) if fig is not None else None
        return tables.section(table, rows, teacher, command, wall, link), fig

    def summary_entry(self, plan: Plan, rows_by_table: dict, teacher: Optional[dict],
                      data_counts: Optional[dict]) -> dict:
        return tables.summary_entry(plan, rows_by_table, teacher, data_counts)


class DistillRuns(RetrievalRuns):
    trainer = "pipeline.distill.trainer:train"


class AdaptRuns(RetrievalRuns):
    trainer = "pipeline.adapt.trainer:train"
