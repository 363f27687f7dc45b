"""Stage 3: evaluate the teacher (from its cache) and student exports, then write the comparison report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pipeline.common.errors import PipelineError
from stages.common import TRUST_UNCHECKED, resolve_device
from pipeline.common import paths


def _print(name: str, r: dict, evaluated_now: bool) -> None:
    if not evaluated_now:
        typer.echo(f"{name}: up to date, not re-evaluated")
        return
    m = r["metrics"]
    typer.echo(f"{name}: RSUM {m['rsum']:.1f} (i2t R@1 {m['i2t_r1']:.1f}, t2i R@1 {m['t2i_r1']:.1f})")


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
    trust_unchecked: bool = TRUST_UNCHECKED,
) -> None:
    """Retrieval R@1/5/10 + RSUM of the teacher and students on a split (method.md section 2) + a report."""
    from pipeline.data.manifest import Manifest
    from pipeline.distill.trainer import export_reads_teacher
    from pipeline.features.cache import FeatureCache
    from pipeline.retrieval.evaluate import TRUNCATED_CAPTIONS, SpeedSettings, safe_name
    from pipeline.retrieval.exports import (
        EvalOptions, find_exports, foreign_exports, result_name, student_unless_fresh, teacher_unless_fresh,
    )
    from pipeline.retrieval.report import write_report

    manifest = Manifest.read(paths.manifest_path(manifest_dir, split))
    if not paths.cache_split_dir(cache_dir, split).is_dir():
        raise PipelineError(f"no {split} cache in {cache_dir}; run `clipdistill teacher-features` for it")
    cache = FeatureCache(paths.cache_split_dir(cache_dir, split), expect_manifest_hash=manifest.content_hash,
                         verify=True if verify else None)
    exports = find_exports(runs, runs_dir)
    # runs named by the user are never skipped silently
    skipped = {} if runs else foreign_exports(exports, cache, export_reads_teacher)
    exports = [e for e in exports if e not in skipped]
    opts = EvalOptions(split, index, TRUNCATED_CAPTIONS if truncate_captions else None, resolve_device(device),
                       batch_size, workers, SpeedSettings(repeats=latency_repeats) if latency_repeats > 0 else None,
                       teacher_spec)

    teacher_dir = out / safe_name(f"teacher-{cache.meta.teacher_name}")
    r, now = teacher_unless_fresh(cache, manifest, opts, teacher_dir, force=force)
    _print(teacher_dir.name, r, now)
    results = [r]
    taken = {teacher_dir.name}
    for export in exports:
        model_dir = out / result_name(export, taken)
        r, now = student_unless_fresh(export, manifest, cache, opts, model_dir, model_dir.name, force=force,
                                      reads_teacher=export_reads_teacher)
        _print(model_dir.name, r, now)
        results.append(r)
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
