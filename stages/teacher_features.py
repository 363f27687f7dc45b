"""Stage 1: run the teacher once over every split and cache L2-normalised embeddings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from pipeline.common.errors import PipelineError
from pipeline.common.io import human_bytes
from stages.common import TRUST_UNCHECKED, resolve_device
from pipeline.common import paths
from pipeline.features.engines import ENGINES


def teacher_features(
    manifest_dir: Path = typer.Option(..., help="Directory holding <split>.parquet manifests."),
    out: Path = typer.Option(..., help="Cache directory for this dataset x teacher; one subfolder per split."),
    teacher: str = typer.Option("lit", help="Teacher spec: lit or lit:CKPT, openclip:ARCH/TAG (or ARCH/CHECKPOINT), hf:NAME or hf:DIR, dual:EXPORT, ensemble:SPEC+SPEC."),
    splits: str = typer.Option("train,val,test", help="Comma-separated splits to cache (missing ones are skipped)."),
    dataset: Optional[str] = typer.Option(None, help="Dataset name recorded in the cache (default: folder name)."),
    shard_size: int = typer.Option(4096, help="Unique images per shard file (the unit of resume)."),
    shard_index: Optional[int] = typer.Option(None, help="This process's index among --num-shards (default: $RANK or 0)."),
    num_shards: Optional[int] = typer.Option(None, help="Number of parallel processes (default: $WORLD_SIZE or 1)."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    workers: int = typer.Option(2, help="DataLoader workers reading (and, off the device path, decoding) images."),
    decode: str = typer.Option("auto", help="Where images are decoded and preprocessed: auto (on the GPU when "
                               "there is one and the teacher's preprocessing has a tensor form; JPEGs via nvJPEG), "
                               "cpu (PIL in the workers), device (also on a CPU device)."),
    dtype: str = typer.Option("float16", help="Stored embedding dtype: float16 or float32."),
    views: int = typer.Option(0, help="Also cache the teacher's embeddings of K seeded random crops per image, with "
                              "each crop's box, for stage 2 to replay exactly (data.views). 0: none."),
    view_scale: str = typer.Option("0.35,1.0", help="Area range of the view crops, as fractions of the image."),
    view_flip: bool = typer.Option(False, help="Also flip half the views left-right (off: emoji and icons have "
                                   "left/right meaning)."),
    view_seed: int = typer.Option(0, help="Seed of the views (a view is a function of seed, image id, index)."),
    view_splits: str = typer.Option("train", help="Comma-separated splits that get the views (stage 2 replays "
                                    "them on the training split only; val and test are encoded whole)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    trust_unchecked: bool = TRUST_UNCHECKED,
    engine: str = typer.Option("local", help="Who runs the shards: local (this process) or ray (an actor pool on a "
                               "Ray cluster, the 'cluster' extra; each actor loads the teacher once)."),
    address: Optional[str] = typer.Option(None, help="--engine ray: the cluster to join (auto, or HOST:PORT of a "
                                          "`ray start --head`); default: start a local one."),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help="--engine ray: actors (default: one per "
                                              "CPU, or per --gpus-per-worker GPUs, growing as machines join)."),
    gpus_per_worker: float = typer.Option(0.0, help="--engine ray: GPUs per actor (1: one actor per GPU)."),
    max_retries: int = typer.Option(3, help="--engine ray: retries of a shard whose worker died."),
) -> None:
    """Encode manifest splits with the teacher and write HDF5 cache shards (resumable, shardable)."""
    from pipeline.features.job import run_feature_job
    from pipeline.teachers import load_teacher

    shard_index = int(os.environ.get("RANK", 0)) if shard_index is None else shard_index
    num_shards = int(os.environ.get("WORLD_SIZE", 1)) if num_shards is None else num_shards
    wanted = [s.strip() for s in splits.split(",") if s.strip()]
    present = paths.present_splits(manifest_dir, wanted)
    if not present:
        raise PipelineError(f"no manifests for splits {wanted} in {manifest_dir}")
    from pipeline.features.device_input import choose_decode

    from pipeline.features.views import ViewSpec, teacher_view_transform

    try:
        scale = tuple(float(x) for x in view_scale.split(","))
    except ValueError:
        raise PipelineError(f"--view-scale must be two numbers like 0.35,1.0, not {view_scale!r}") from None
    if len(scale) != 2:
        raise PipelineError(f"--view-scale must be two numbers like 0.35,1.0, not {view_scale!r}")
    spec = ViewSpec(views, view_seed, scale, flip=view_flip) if views else None
    view_set = {s.strip() for s in view_splits.split(",") if s.strip()}
    if spec and not view_set <= set(wanted):
        raise PipelineError(f"--view-splits {view_splits!r} names splits that are not cached here "
                            f"(--splits {','.join(wanted)}): a typo would leave the training split without views")
    if engine not in ENGINES:
        raise PipelineError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "ray":
        from pipeline.features.engines.ray import RayEngine, RayOptions

        runner = RayEngine(teacher, RayOptions(address=address, workers=ray_workers, gpus_per_worker=gpus_per_worker,
                                               max_retries=max_retries, device=device),
                           decode=decode, views=bool(spec), echo=typer.echo)
        ident = runner.identity
        typer.echo(f"teacher {ident.fp} (width {ident.width}) on {len(runner.actors)} Ray workers ({ident.device}); "
                   f"images decoded {'on the device' if ident.decode_on_device else 'in CPU workers'}")
        run = runner.run
    else:
        model = load_teacher(teacher, device=resolve_device(device))
        if spec:
            teacher_view_transform(model)  # a teacher without a stated preprocessing fails here, not per shard
        on_device = choose_decode(decode, model.device, model.tensor_preprocess())  # a bad --decode fails here
        typer.echo(f"teacher {model.fingerprint()} (width {model.width}) on {model.device}; images decoded "
                   f"{'on the device' if on_device else 'in CPU workers'}")
        runner = None

        def run(job, progress):
            return run_feature_job(job, model, progress=progress)
    try:
        for split in present:
            _run_split(split, run, manifest_dir, out, dataset, shard_size, shard_index, num_shards, batch_size,
                       workers, dtype, decode, spec if split in view_set else None, views, progress)
    finally:
        if runner is not None:
            runner.shutdown()


def _run_split(split, run, manifest_dir, out, dataset, shard_size, shard_index, num_shards, batch_size, workers,
               dtype, decode, spec, views, progress) -> None:
    """One split through either engine; the same summary line."""
    from pipeline.data.manifest import Manifest
    from pipeline.features.job import FeatureJob

    manifest = Manifest.read(paths.manifest_path(manifest_dir, split))
    job = FeatureJob(
        manifest=manifest, dataset=dataset or manifest_dir.name, split=split, out_dir=paths.cache_split_dir(out, split),
        shard_size=shard_size, shard_index=shard_index, num_shards=num_shards,
        batch_size=batch_size, num_workers=workers, dtype=dtype, decode=decode,
        views=spec,
    )
    s = run(job, progress)
    size = sum(p.stat().st_size for p in job.out_dir.glob("shard-*.h5"))
    typer.echo(
        f"{split}: {s.images} images{f' x {views} views' if job.views else ''} + {s.texts} captions encoded in {s.seconds:.1f}s "
        f"({s.items_per_second:.1f} items/s; read {s.read_seconds:.1f}s, model {s.model_seconds:.1f}s, "
        f"write {s.write_seconds:.1f}s), {s.rejects} rejects, "
        f"{len(s.shards_written)} shards written, {len(s.shards_skipped)} already complete; "
        f"{'complete' if s.complete else 'partial (other shard processes pending)'} -> {job.out_dir} "
        f"({human_bytes(size)})"
    )
