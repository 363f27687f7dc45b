"""Stage 3: evaluate the teacher (from its cache) and student exports, then write the comparison report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pipeline.common.errors import PipelineError
from stages.common import resolve_device
from pipeline.common import paths


def _exports(runs: Optional[List[Path]], runs_dir: Path) -> list[Path]:
    """Student export files from run folders or export paths; every export under runs_dir by default."""
    if not runs:
        return sorted(p for p in (paths.student_export(r) for r in sorted(runs_dir.glob("*"))) if p.is_file())
    out = []
    for run in runs:
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


def _foreign(exports: list[Path], cache) -> dict[Path, str]:
    """Exports distilled from another teacher or dataset than ``cache`` holds, with the reason to skip each."""
    from pipeline.retrieval.evaluate import foreign_export_reason

    reasons = {export: foreign_export_reason(export, cache) for export in exports}
    return {export: why for export, why in reasons.items() if why}


def _name(export: Path, taken: set[str]) -> str:
    """Folder name of a student's results: its run's name (export at runs/<name>/export/student.pt)."""
    from pipeline.retrieval.evaluate import safe_name

    run = paths.run_of_export(export)
    base = safe_name(run.name if run else export.stem)
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    taken.add(name)
    return name


def _summary(r: dict) -> str:
    m = r["metrics"]
    return f"RSUM {m['rsum']:.1f} (i2t R@1 {m['i2t_r1']:.1f}, t2i R@1 {m['t2i_r1']:.1f})"


def evaluate(
    runs: Optional[List[Path]] = typer.Argument(
        None, help="Run folders or student export files (default: every RUNS_DIR/*/export/student.pt)."),
    cache_dir: Path = typer.Option(..., help="Teacher cache root of the dataset (holds a <split>/ folder)."),
    manifest_dir: Path = typer.Option(..., help="Directory holding <split>.parquet manifests."),
    split: str = typer.Option("test", help="Split to evaluate on."),
    teacher_spec: Optional[str] = typer.Option(
        None, help="Spec of the cache's teacher, to measure its params and latency (e.g. "
                   "lit:artifacts/teachers/lit-openmoji.pt). Its recalls always come from the cache."),
    index: str = typer.Option(
        "exact", help="exact (IndexFlatIP), auto (size-based choice) or a FAISS factory string."),
    out: Path = typer.Option(
        Path("artifacts/eval"), help="Output folder: one subfolder per model + report.md."),
    truncate_captions: bool = typer.Option(
        False, "--truncate-captions",
        help="Keep only the first 5 captions per image, as the published protocols (default: keep all)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    force: bool = typer.Option(
        False, "--force", help="Re-evaluate even when a result is newer than its model."),
    runs_dir: Path = typer.Option(Path("runs"), help="Where to look for runs when none are given."),
    batch_size: int = typer.Option(64, help="Images per forward pass when embedding the split."),
    workers: int = typer.Option(2, help="DataLoader workers decoding images."),
    latency_repeats: int = typer.Option(20, help="Single-item passes per latency median (0: skip speed)."),
    report: bool = typer.Option(True, help="Write report.md and the figures (--no-report: results only)."),
    verify: bool = typer.Option(False, "--verify", help="Check every cache shard's content in full, even "
                                "shards verified before (default: only shards new to this place)."),
) -> None:
    """Retrieval R@1/5/10 + RSUM of the teacher and students on a split (method.md section 2) + a report."""
    from pipeline.features.cache import FeatureCache
    from pipeline.retrieval.evaluate import (
        TRUNCATED_CAPTIONS, SpeedSettings, evaluate_student, evaluate_teacher_cache, is_fresh, read_result,
        safe_name, student_settings, teacher_settings,
    )
    from pipeline.data.manifest import Manifest
    from pipeline.retrieval.report import write_report

    manifest = Manifest.read(paths.manifest_path(manifest_dir, split))
    if not paths.cache_split_dir(cache_dir, split).is_dir():
        raise PipelineError(f"no {split} cache in {cache_dir}; run `clipdistill teacher-features` for it")
    cache = FeatureCache(paths.cache_split_dir(cache_dir, split), expect_manifest_hash=manifest.content_hash,
                         verify=True if verify else None)
    exports = _exports(runs, runs_dir)
    skipped = {} if runs else _foreign(exports, cache)  # runs named by the user are never skipped silently
    exports = [e for e in exports if e not in skipped]
    device = resolve_device(device)
    max_caps = TRUNCATED_CAPTIONS if truncate_captions else None
    speed = SpeedSettings(repeats=latency_repeats) if latency_repeats > 0 else None

    teacher_dir = out / safe_name(f"teacher-{cache.meta.teacher_name}")
    settings = teacher_settings(split, index, max_caps, manifest, teacher_spec)
    if not force and is_fresh(teacher_dir, cache.shard_paths, settings):
        typer.echo(f"{teacher_dir.name}: up to date, not re-evaluated")
    else:
        r = evaluate_teacher_cache(cache, manifest, index, teacher=teacher_spec, split=split,
                                   max_captions_per_image=max_caps, out_dir=teacher_dir,
                                   name=teacher_dir.name, device=device, speed=speed)
        typer.echo(f"{teacher_dir.name}: {_summary(r)}")
    results = [read_result(teacher_dir)]

    taken = {teacher_dir.name}
    for export in exports:
        model_dir = out / _name(export, taken)
        settings = student_settings(split, index, max_caps, manifest, cache)
        if not force and is_fresh(model_dir, [export], settings):
            typer.echo(f"{model_dir.name}: up to date, not re-evaluated")
        else:
            r = evaluate_student(export, manifest, cache, index, split=split, max_captions_per_image=max_caps,
                                 out_dir=model_dir, name=model_dir.name, device=device, batch_size=batch_size,
                                 workers=workers, speed=speed)
            typer.echo(f"{model_dir.name}: {_summary(r)}")
        results.append(read_result(model_dir))
    for export, why in skipped.items():
        typer.echo(f"skipped {paths.run_of_export(export) or export}: {why}")
    if not exports:
        typer.echo(f"no student exports of this cache's teacher under {runs_dir}; reporting the teacher only")

    if not report:
        return
    written = write_report(results, out)
    typer.echo("\n" + written.table + "\n")
    typer.echo(f"report: {written.markdown}")
    for path in written.figures:
        typer.echo(f"figure: {path}")
