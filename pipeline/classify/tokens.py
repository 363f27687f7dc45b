"""teacher-tokens for a classification run (method.md 4, step-1 inputs): each split's token cache, then the class
prompts, then ``summary.json`` with the sizes of everything in the token folder.

A split's token cache is a stage-1 job (``pipeline.features.tokens``: reader, mapper, writer); its image tokens are
an optional capability of the teacher backend (``Teacher.image_tokens``), refused in one line by a backend without.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from pipeline.classify.config import ClassifyConfig
from pipeline.classify.labels import image_labels
from pipeline.classify.prompts import cache_prompts
from pipeline.common import io, paths
from pipeline.common.io import human_bytes
from pipeline.common.distributed import resolve_device
from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest
from pipeline.features.tokens import TokenSummary, run_token_job

Log = Callable[[str], None]


def _split_line(s: TokenSummary) -> str:
    what = "already cached" if s.skipped else f"encoded in {s.seconds:.1f}s"
    return (f"{s.split}: {s.images} images x {s.shape[0]} tokens x {s.shape[1]} + {s.captions} captions "
            f"{what}, {s.rejects} rejects -> {s.path} ({human_bytes(s.bytes)})")


def cache_run_tokens(cfg: ClassifyConfig, splits: Sequence[str], progress: bool = True,
                     log: Log = lambda line: None) -> dict:
    """Encode the run's splits (those with a manifest) and class prompts with ``cfg.teacher`` into
    ``cfg.data.tokens_dir``; returns (and writes as summary.json) what is there."""
    from pipeline.teachers import load_teacher  # loads torch and the backend: only when it runs

    manifest_dir, out = Path(cfg.data.manifest_dir), Path(cfg.data.tokens_dir)
    present = paths.present_splits(manifest_dir, list(splits))
    if not present:
        raise PipelineError(f"no manifests for splits {','.join(splits)} in {manifest_dir}")
    teacher = load_teacher(cfg.teacher, device=resolve_device(cfg.device))
    log(f"teacher {teacher.fingerprint()} on {teacher.device} -> {out}")
    record: dict = {"teacher": cfg.teacher, "fingerprint": teacher.fingerprint(), "splits": {}}
    labels: set[str] = set()
    for split in present:
        manifest = Manifest.read(paths.manifest_path(manifest_dir, split))
        if split == cfg.data.train_split:
            labels = set(image_labels(manifest)[0].values())
        s = run_token_job(teacher, manifest, split, out, captions=cfg.data.captions, batch_size=cfg.data.batch_size,
                          workers=cfg.data.workers, progress=progress)
        log(_split_line(s))
        record["splits"][split] = {"images": s.images, "captions": s.captions, "rejects": s.rejects,
                                   "tokens": list(s.shape), "bytes": s.bytes}
    if len(labels) >= 2:
        classes = sorted(labels)
        path = cache_prompts(teacher, classes, list(cfg.text.templates), out)
        log(f"class prompts: {len(classes)} classes x {len(cfg.text.templates)} template(s) -> {path}")
        record["prompts"] = {"path": path.name, "classes": len(classes), "templates": list(cfg.text.templates)}
    else:
        log("no class labels in the training manifest: class prompts not cached")
    record["bytes"] = sum(p.stat().st_size for p in out.glob("*.h5"))
    io.write_json(out / "summary.json", record)
    log(f"token cache size: {human_bytes(record['bytes'])} in {out}")
    return record


__all__ = ["cache_run_tokens"]
