"""The runner's adapter for classification runs (``classify``): each run evaluates itself on its test split
(its results.json), so there is no teacher cache; ``--reevaluate`` measures finished runs again."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

from pipeline.common.errors import PipelineError
from pipeline.experiments import classify_tables
from pipeline.experiments.adapters import CommandAdapter, Log
from pipeline.experiments.records import classification_results, read_record, write_record
from pipeline.experiments.sweep import Plan, SweepTable


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


class ClassifyRuns(CommandAdapter):
    trainer = "pipeline.classify.experiment:run_both"  # steps 1 and 2, as `clipdistill classify`

    def evaluate(self, plan: Plan, *, tables_only: bool, reevaluate: bool,
                 log: Log) -> tuple[Optional[dict], dict[str, dict]]:
        records = mark_classification_runs(plan)
        if reevaluate:
            reevaluate_classification_runs(plan, records, log)
        return None, records

    def read_result(self, plan: Plan) -> Optional[Callable[[str], Optional[dict]]]:
        return lambda key: classification_results(plan.run_dir(key))

    def section(self, plan: Plan, table: SweepTable, rows: list, teacher: Optional[dict], command: str,
                wall: str, figures_dir: Optional[Path], results: Path) -> tuple[str, Optional[Path]]:
        return classify_tables.section(table, rows, command, wall), None

    def summary_entry(self, plan: Plan, rows_by_table: dict, teacher: Optional[dict],
                      data_counts: Optional[dict]) -> dict:
        return classify_tables.summary_entry(plan, rows_by_table)
