"""Check stored files against their recorded checksums: a cache, a run folder or a single file."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.common.errors import PipelineError


def verify(
    path: Path = typer.Argument(..., help="A cache (dataset x teacher folder or one split), a run folder, a shard, "
                                          "a checkpoint or an export."),
) -> None:
    """One line per file: ok, damaged (with what differs), missing or unchecked; exit 1 on any damage."""
    import h5py

    from pipeline.common import io
    from pipeline.features.cache.format import SHARD_RE, CacheMeta, shard_name
    from pipeline.features.cache.integrity import LEGACY, shard_problems, stamp

    if not path.exists():
        raise PipelineError(f"nothing to verify at {path}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    shards = [p for p in files if SHARD_RE.match(p.name)]
    stored = [p for p in files if p.suffix == ".pt" and "queue" not in p.parts]
    if not shards and not stored:
        raise PipelineError(f"{path} holds no cache shards, checkpoints or exports")
    bad = 0

    def report(status: str, file: Path, detail: str = "") -> None:
        nonlocal bad
        bad += status in ("damaged", "missing")
        typer.echo(f"{status:<9} {file}" + (f": {detail}" if detail else ""))

    for split_dir in sorted({p.parent for p in shards}):
        present = sorted(p for p in shards if p.parent == split_dir)
        try:
            with h5py.File(present[0], "r") as f:
                total = CacheMeta.from_attrs(f.attrs).total_shards
            for name in (shard_name(i, total) for i in range(total)):
                if not (split_dir / name).exists():
                    report("missing", split_dir / name, f"shard {name} of {total}")
        except (OSError, KeyError, TypeError):
            pass  # the unreadable shard is reported below
        for shard in present:
            problems = shard_problems(shard)
            if problems == [LEGACY]:
                report("unchecked", shard, LEGACY)
            elif problems:
                report("damaged", shard, "; ".join(problems))
            else:
                stamp(shard)
                report("ok", shard)
    for file in stored:
        problem = io.verify_file(file)
        if problem == "no checksum recorded":
            report("unchecked", file, "no checksum recorded (written before checksums)")
        elif problem:
            report("damaged", file, problem)
        else:
            report("ok", file)
    typer.echo(f"{bad} damaged or missing" if bad else "all checked files are intact")
    if bad:
        raise typer.Exit(1)
