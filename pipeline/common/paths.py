"""Where things live on disk, named once: split manifests, cache splits, run folders and their files."""

from __future__ import annotations

from pathlib import Path

REJECTS = "rejects.parquet"


def manifest_path(manifest_dir: str | Path, split: str) -> Path:
    """``<manifest_dir>/<split>.parquet``: one manifest per split (stage 0)."""
    return Path(manifest_dir) / f"{split}.parquet"


def cache_split_dir(cache_dir: str | Path, split: str) -> Path:
    """``<cache_dir>/<split>/``: the shards of one split of a dataset x teacher cache (stage 1)."""
    return Path(cache_dir) / split


def present_splits(manifest_dir: str | Path, wanted: list[str]) -> list[str]:
    return [s for s in wanted if manifest_path(manifest_dir, s).exists()]


def run_dir(runs_dir: str | Path, name: str) -> Path:
    return Path(runs_dir) / name


def last_checkpoint(run: str | Path) -> Path:
    return Path(run) / "checkpoints" / "last.pt"


def best_checkpoint(run: str | Path) -> Path:
    return Path(run) / "checkpoints" / "best.pt"


def student_export(run: str | Path) -> Path:
    """``<run>/export/student.pt``: what stage 3 evaluates and users deploy."""
    return Path(run) / "export" / "student.pt"


def run_of_export(export: str | Path) -> Path | None:
    """The run folder an export belongs to (``<run>/export/student.pt``), or None for a loose file."""
    export = Path(export)
    return export.parent.parent if export.parent.name == "export" else None
