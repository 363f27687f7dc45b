"""A sweep run's folder as the runner sees it: its record (``experiment.json``), whether it is trained and
evaluated, and the pruning of finished runs' checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

from pipeline.common import io, paths
from pipeline.common.runlog import read_metrics
from pipeline.experiments.sweep import EVAL_DIR, Plan

EXPERIMENT_FORMAT = "clipdistill-experiment/1"
RECORD_FILE = "experiment.json"
EXPORT = Path("export") / "student.pt"
CLASSIFY_RESULTS = "results.json"  # a classification run's every number (pipeline.classify.experiment)

Log = Callable[[str], None]


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


def is_results_only(run_dir: Path) -> bool:
    """A finished run restored from a results archive (pipeline.experiments.archive): its record and stage-3
    result without the export, which stayed on the machine that trained it."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    return (bool(record.get("results_from")) and record.get("status") == "done"
            and (run_dir / EVAL_DIR / "result.json").is_file() and not (run_dir / EXPORT).is_file())


def is_trained(run_dir: Path) -> bool:
    return ((Path(run_dir) / EXPORT).is_file() or classification_results(run_dir) is not None
            or is_results_only(run_dir))


def is_evaluated(run_dir: Path) -> bool:
    """The export and an evaluation result newer than it exist (what a rerun skips); a classification run
    evaluates itself, so a complete one is evaluated; a run restored from an archive has only its result."""
    if classification_results(run_dir) is not None or is_results_only(run_dir):
        return True
    export, result = Path(run_dir) / EXPORT, Path(run_dir) / EVAL_DIR / "result.json"
    return export.is_file() and result.is_file() and result.stat().st_mtime > export.stat().st_mtime


def best_val_rsum(run_dir: Path) -> Optional[float]:
    """The run's best-epoch RSUM on its val split: the score its trainer chose the exported epoch by (from its
    metrics log); None for a run without val records or with an unreadable log."""
    try:
        scores = [float(r["rsum"]) for r in read_metrics(run_dir, "val")]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return max(scores) if scores else None


def record_val_rsum(run_dir: Path) -> None:
    """Keep a finished run's best-epoch val RSUM in its record, which the results archive carries (the metrics log
    stays on the machine that trained it): tables can then compare rows on the selection split too."""
    record = read_record(run_dir)
    score = best_val_rsum(run_dir) if record.get("status") == "done" else None
    if score is not None and record.get("best_val_rsum") != round(score, 3):
        record["best_val_rsum"] = round(score, 3)
        write_record(run_dir, record)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every checkpoints folder of a run: its own, or (a classification run) one per head, fold and generation."""
    return sorted(p.parent for p in Path(run_dir).glob(f"**/{paths.last_checkpoint('').as_posix()}"))


def prune_checkpoints(plan: Plan, log: Log = print) -> tuple[int, int]:
    """Delete the checkpoints of the plan's finished runs (exported, evaluated, status done); returns (runs, bytes).

    Checkpoints only serve to resume training, and they are most of a run's disk (the weights plus AdamW's two
    moments: 0.3 of 0.5 GB for the default student), so a sweep of a hundred runs fills a disk with them. A
    run that is not finished keeps its checkpoints so that it can still resume; the record notes the pruning.
    """
    runs, freed = 0, 0
    for key in plan.runs:
        run_dir = plan.run_dir(key)
        ckpts = checkpoint_dirs(run_dir)
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


def fmt_time(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
