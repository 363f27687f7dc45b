"""Finding student exports and evaluating them (and a cache's teacher) unless a fresh result exists.

The one "evaluate unless fresh" of stage 3: `clipdistill eval` and the experiment runner both call it, so a
result counts as up to date by the same rule (pipeline.retrieval.evaluate.is_fresh) wherever it was made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from pipeline.common import paths
from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest
from pipeline.features.cache import FeatureCache
from pipeline.retrieval.evaluate import (
    ReadsTeacher, SpeedSettings, evaluate_student, evaluate_teacher_cache, foreign_export_reason, is_fresh,
    read_result, safe_name, student_settings, teacher_settings,
)


class ForeignExport(PipelineError):
    """A student export of another teacher or dataset than the cache it was to be evaluated with."""


@dataclass(frozen=True)
class EvalOptions:
    """How a split is evaluated (what enters the stored settings, and how the models are run)."""

    split: str = "test"
    index: str = "exact"
    max_captions_per_image: Optional[int] = None
    device: str = "cpu"
    batch_size: int = 64
    workers: int = 2
    speed: Optional[SpeedSettings] = SpeedSettings()
    teacher_spec: Optional[str] = None  # the cache's teacher, to measure its params and latency


def find_exports(runs: Optional[Sequence[Path]], runs_dir: Path) -> list[Path]:
    """Student export files from run folders or export paths; every export under runs_dir by default."""
    if not runs:
        return sorted(p for p in (paths.student_export(r) for r in sorted(Path(runs_dir).glob("*"))) if p.is_file())
    out = []
    for run in map(Path, runs):
        if run.is_dir():
            export = paths.student_export(run)
            if not export.is_file():
                raise PipelineError(f"run {run} has no student export ({export}); has its training finished?")
            out.append(export)
        elif run.is_file():
            out.append(run)
        else:
            raise PipelineError(f"run folder or student export not found: {run}")
    return out


def foreign_exports(exports: Sequence[Path], cache: FeatureCache,
                    reads_teacher: ReadsTeacher | None = None) -> dict[Path, str]:
    """Exports distilled from another teacher or dataset than ``cache`` holds, with the reason to skip each."""
    reasons = {export: foreign_export_reason(export, cache, reads_teacher) for export in exports}
    return {export: why for export, why in reasons.items() if why}


def result_name(export: Path, taken: set[str]) -> str:
    """Folder name of a student's results: its run's name (export at runs/<name>/export/student.pt), made
    unique among ``taken`` (which it joins)."""
    run = paths.run_of_export(export)
    base = safe_name(run.name if run else export.stem)
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    taken.add(name)
    return name


def teacher_unless_fresh(cache: FeatureCache, manifest: Manifest, opts: EvalOptions, out_dir: Path, *,
                         force: bool = False, name: str | None = None,
                         require_speed: bool | None = None) -> tuple[dict, bool]:
    """The teacher's stored result (from its cache), evaluated first unless a fresh one exists; returns
    (record, evaluated now). ``require_speed``: a stored result counts as fresh only if it has (True) or lacks
    (False) speed numbers."""
    settings = teacher_settings(opts.split, opts.index, opts.max_captions_per_image, manifest, opts.teacher_spec)
    if not force and is_fresh(out_dir, cache.shard_paths, settings) and (
            require_speed is None or (read_result(out_dir).get("speed") is not None) == require_speed):
        return read_result(out_dir), False
    evaluate_teacher_cache(cache, manifest, opts.index, teacher=opts.teacher_spec, split=opts.split,
                           max_captions_per_image=opts.max_captions_per_image, out_dir=out_dir,
                           name=name or Path(out_dir).name, device=opts.device, speed=opts.speed)
    return read_result(out_dir), True


def student_unless_fresh(export: Path, manifest: Manifest, cache: FeatureCache | None, opts: EvalOptions,
                         out_dir: Path, name: str, *, force: bool = False, skip_foreign: bool = False,
                         reads_teacher: ReadsTeacher | None = None) -> tuple[dict, bool]:
    """A student export's stored result, evaluated first unless a fresh one exists (same settings, newer
    than the export); returns (record, evaluated now). ``skip_foreign``: an export to evaluate that belongs to
    another teacher or dataset than ``cache`` raises ForeignExport (with the reason) before any work."""
    settings = student_settings(opts.split, opts.index, opts.max_captions_per_image, manifest, cache)
    if not force and is_fresh(out_dir, [export], settings):
        return read_result(out_dir), False
    foreign = foreign_export_reason(export, cache, reads_teacher) if skip_foreign and cache is not None else None
    if foreign:
        raise ForeignExport(foreign)
    evaluate_student(export, manifest, cache, opts.index, split=opts.split,
                     max_captions_per_image=opts.max_captions_per_image, out_dir=out_dir, name=name,
                     device=opts.device, batch_size=opts.batch_size, workers=opts.workers, speed=opts.speed,
                     reads_teacher=reads_teacher)
    return read_result(out_dir), True
