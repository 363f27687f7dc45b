"""Stage 2: distil a student from cached teacher targets (method.md section 1).

One flat loop: per step, gather targets from the memory-mapped cache, run the student, compute
the enabled multiscale losses against the negative queue, balance them, step, enqueue. Every
epoch: close the balancer window, validate (Recall@K/RSUM on the val split), checkpoint, keep
the best. A checkpoint holds everything a resumed run needs to continue bit-for-bit on CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from pipeline.common.precision import autocast
from pipeline.common import paths
from pipeline.common import config as cfgio
from pipeline.distill.balancer import make_balancer
from pipeline.features.cache import FeatureCache
from pipeline.common.distributed import DistEnv, barrier, broadcast_object, gather_rows, init_from_env, resolve_device, shutdown
from pipeline.features.encode import embed_manifest
from pipeline.common.errors import PipelineError
from pipeline.distill.losses import LossConfig, MultiscaleDistillLoss
from pipeline.data.manifest import Manifest
from pipeline.retrieval.metrics import recall_at_k
from pipeline.distill.queue import NegativeQueue, QueueBatch
from pipeline.common.runlog import RunLogger, truncate_after
from pipeline.students import (
    StudentConfig, StudentEncoder, build_student, export_student, export_torchscript, get_preset,
)
from pipeline.train.schedule import Schedule
from pipeline.train.state import (
    atomic_save, load_checkpoint, prepare_run_dir, rng_state, seed_all, set_rng_state,
)
from pipeline.distill.data import (
    EpochOrder, PairDataset, align, check_teacher_norms, gather_targets, make_loader, teacher_targets,
)


@dataclass(frozen=True)
class DataSection:
    manifest_dir: str = "data/openmoji"
    cache_dir: str = "artifacts/cache/openmoji/lit"  # holds one folder per split
    train_split: str = "train"
    val_split: str = "val"  # validated every epoch when its manifest and cache exist
    workers: int = 1
    preload: bool = True  # decode every image once into RAM (small datasets); False streams from disk
    # False: train against the teacher's raw (un-normalised) embeddings, the paper's ablation (method.md 1.6);
    # needs a cache that stores the norms.
    teacher_normalized: bool = True


@dataclass(frozen=True)
class QueueSection:
    size: int = 8192
    mode: str = "fifo"  # fifo (paper: recent batches) | random (rows sampled from the cache, method.md 1.1)
    refill_every: int = 0  # random mode: refill every N steps (0: at every epoch start)
    dtype: str = "float32"


@dataclass(frozen=True)
class BalancerSection:
    kind: str = "dynamic"  # dynamic | fixed | reference (method.md 1.5)
    temperature: float = 1.0
    window_steps: Optional[int] = None  # None: a window is an epoch
    ema: float = 0.99
    weights: Optional[dict] = None  # fixed kind only


@dataclass(frozen=True)
class OptimSection:  # defaults: the paper's schedule (method.md 1.6)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 64
    epochs: int = 20
    decay_epochs: tuple = (10,)
    decay_factor: float = 0.1
    warmup_steps: int = 0
    grad_clip: float = 1.0


@dataclass(frozen=True)
class DistillConfig:
    name: str = "default"
    runs_dir: str = "runs"
    student: str = "lite"  # preset name (pipeline.students.PRESETS)
    student_overrides: dict = field(default_factory=dict)  # merged into the preset's config
    data: DataSection = field(default_factory=DataSection)
    losses: LossConfig = field(default_factory=LossConfig)
    queue: QueueSection = field(default_factory=QueueSection)
    balancer: BalancerSection = field(default_factory=BalancerSection)
    optim: OptimSection = field(default_factory=OptimSection)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU | fp32 | bf16
    log_every: int = 10
    checkpoint_every: int = 0  # extra checkpoints every N steps (0: at epoch ends only)
    max_steps: int = 0  # stop after this many steps in total (0: run all epochs)
    eval_batch_size: int = 128


class NonFiniteLoss(PipelineError):
    pass


def student_config(cfg: DistillConfig, width: int) -> StudentConfig:
    base = get_preset(cfg.student, embed_dim=width).to_dict()
    cfgio.deep_merge(base, dict(cfg.student_overrides))
    base["embed_dim"] = width  # the student always projects to the teacher's width
    return StudentConfig.from_dict(base)


def validate(model, manifest: Manifest, batch_size: int) -> dict:
    """Student Recall@1/5/10 both ways + RSUM on a split (exact search)."""
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    encoder = StudentEncoder(model)  # switches to eval mode; train mode and grad flags are restored below
    emb = embed_manifest(encoder, manifest, batch_size=batch_size, workers=0)
    for p in trainable:
        p.requires_grad_(True)
    model.train(was_training)
    return recall_at_k(emb.image_emb, emb.text_emb, emb.text_image_idx)


@dataclass
class TrainResult:
    run_dir: Path
    best_rsum: float
    best_epoch: int
    steps: int
    seconds: float
    export_path: Optional[Path]






def _open_split(cfg: DistillConfig, split: str, required: bool):
    manifest_path = paths.manifest_path(cfg.data.manifest_dir, split)
    cache_dir = paths.cache_split_dir(cfg.data.cache_dir, split)
    if not manifest_path.exists() or not cache_dir.exists():
        if required:
            raise PipelineError(f"need {manifest_path} and a cache in {cache_dir}; run `make teacher-features`")
        return None, None
    manifest = Manifest.read(manifest_path)
    return manifest, FeatureCache(cache_dir, expect_manifest_hash=manifest.content_hash)


def train(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run (or resume) one distillation run; returns where it went and how it did."""
    started = time.perf_counter()
    device = torch.device(resolve_device(cfg.device))
    env = init_from_env(str(device))
    try:
        return _train(cfg, resume, progress, device, env, started)
    finally:
        shutdown(env)


def _train(cfg: DistillConfig, resume: bool, progress: bool, device: torch.device, env: DistEnv,
           started: float) -> TrainResult:
    run_dir = prepare_run_dir(cfg, resume)
    if env.is_main:
        cfgio.save(cfg, run_dir / "config.json")
    seed_all(cfg.seed + env.rank)

    # ---- data: manifest rows aligned to cached teacher targets -------------------------------
    train_manifest, cache = _open_split(cfg, cfg.data.train_split, required=True)
    val_manifest, val_cache = _open_split(cfg, cfg.data.val_split, required=False)
    rows = align(train_manifest, cache)
    check_teacher_norms(cache, cfg.data.teacher_normalized)
    scfg = student_config(cfg, cache.width)
    model = build_student(scfg).to(device)
    dataset = PairDataset(rows, model.image_transform(train=True), cfg.seed, preload=cfg.data.preload,
                          preload_size=int(scfg.image_size * 1.15))
    sampler = EpochOrder(len(rows), cfg.seed, env.rank, env.world)
    steps_per_epoch = len(sampler) // cfg.optim.batch_size
    if steps_per_epoch == 0:
        raise PipelineError(f"{len(sampler)} training rows per process < batch size {cfg.optim.batch_size}")
    loader = make_loader(dataset, sampler, cfg.optim.batch_size, cfg.data.workers, cfg.seed, device.type == "cuda")

    # ---- objective, queue, balancer, optimiser -----------------------------------------------
    criterion = MultiscaleDistillLoss(cfg.losses)
    queue_dir = run_dir / "queue" / f"rank{env.rank}"
    queue = NegativeQueue.create(queue_dir, cfg.queue.size, cache.width, with_hash=True, dtype=cfg.queue.dtype)
    b = cfg.balancer
    balancer = make_balancer(b.kind, criterion.names, temperature=b.temperature, window_steps=b.window_steps,
                             ema=b.ema, weights=b.weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = Schedule(steps_per_epoch * cfg.optim.epochs, cfg.optim.warmup_steps, "step", steps_per_epoch,
                         tuple(cfg.optim.decay_epochs), cfg.optim.decay_factor).scheduler(optimizer)
    ddp_model = model
    if env.enabled:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_rsum": -1.0, "best_epoch": -1}
    last_path, best_path = paths.last_checkpoint(run_dir), paths.best_checkpoint(run_dir)
    if resume:
        ckpt = load_checkpoint(last_path)  # to host: queue/RNG state stay host-side
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        queue.load_state_dict(ckpt["queue"][env.rank] if env.enabled else ckpt["queue"][0])
        balancer.load_state_dict(ckpt["balancer"])
        state = ckpt["state"]
        set_rng_state(ckpt["rng"][env.rank] if env.enabled else ckpt["rng"][0])
        if env.is_main:
            truncate_after(run_dir, state["global_step"])
    log = RunLogger(run_dir, active=env.is_main)

    def checkpoint(path: Path, extra: dict | None = None) -> None:
        queues = [queue.state_dict()]
        rngs = [rng_state()]
        if env.enabled:  # every rank's queue and RNG go into the one file rank 0 writes
            qs, rs = [None] * env.world, [None] * env.world
            torch.distributed.all_gather_object(qs, queues[0])
            torch.distributed.all_gather_object(rs, rngs[0])
            queues, rngs = qs, rs
        if env.is_main:
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "queue": queues, "balancer": balancer.state_dict(),
                          "rng": rngs, "state": dict(state), "config": cfgio.to_dict(cfg),
                          "student_config": scfg.to_dict(), **(extra or {})}, path)

    def refill_queue() -> None:
        def sample(n: int) -> QueueBatch:
            pick = np.random.default_rng([cfg.seed, state["global_step"], n]).integers(0, len(rows), n)
            img, txt = gather_targets(cache, rows.image_rows[pick], rows.text_rows[pick], cfg.data.teacher_normalized)
            return QueueBatch(img=img, img_ids=rows.image_ids[pick], txt=txt, txt_ids=rows.image_ids[pick],
                              txt_hash=rows.caption_hash[pick])
        queue.refill_random(sample)

    if cfg.queue.mode not in ("fifo", "random"):
        raise PipelineError(f"queue.mode must be fifo or random, not {cfg.queue.mode!r}")
    total_steps = steps_per_epoch * cfg.optim.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    if env.is_main:
        print(f"run {run_dir}: {len(rows)} pairs ({rows.dropped} without cached targets), "
              f"{steps_per_epoch} steps/epoch x {cfg.optim.epochs} epochs, student {scfg.name} "
              f"-> width {cache.width}, losses {list(criterion.names)}, balancer {b.kind}, device {device}")
    model.train()
    window_t0, window_samples = time.perf_counter(), 0
    while state["epoch"] < cfg.optim.epochs and state["global_step"] < total_steps:
        epoch = state["epoch"]
        sampler.set_epoch(epoch, start=state["step_in_epoch"] * cfg.optim.batch_size)
        dataset.epoch = epoch
        if cfg.queue.mode == "random" and state["step_in_epoch"] == 0 and not cfg.queue.refill_every:
            refill_queue()
        bar = tqdm(total=steps_per_epoch, initial=state["step_in_epoch"], desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                   unit="step", disable=not (progress and env.is_main), dynamic_ncols=True)
        for batch in loader:
            if state["step_in_epoch"] >= steps_per_epoch or state["global_step"] >= total_steps:
                break
            if cfg.queue.mode == "random" and cfg.queue.refill_every and state["global_step"] % cfg.queue.refill_every == 0:
                refill_queue()
            idx = batch.rows.numpy()
            t_img, t_txt = teacher_targets(cache, rows, idx, device, cfg.data.teacher_normalized)
            img_ids = torch.from_numpy(rows.image_ids[idx]).to(device)
            hashes = torch.from_numpy(rows.caption_hash[idx]).to(device)
            tokens = {k: v.to(device) for k, v in model.tokenizer(batch.captions).items()}
            with autocast(device, cfg.precision):
                s_img, s_txt = ddp_model(batch.pixels.to(device, non_blocking=True), tokens)
            losses = criterion(s_img.float(), s_txt.float(), t_img, t_txt, img_ids, queue=queue.active(device),
                               captions_hash=hashes)
            total, info = balancer(losses)
            if not torch.isfinite(total):
                bad = {k: float(v.detach()) for k, v in losses.items()}
                raise NonFiniteLoss(
                    f"loss became non-finite at step {state['global_step']} (epoch {epoch + 1}): {bad}; stopped. "
                    f"Last good checkpoint: {last_path if last_path.exists() else 'none yet'}. "
                    "Try a lower optim.lr or precision=fp32.")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                         if cfg.optim.grad_clip > 0 else torch.tensor(float("nan")))
            optimizer.step()
            scheduler.step()
            if cfg.queue.mode == "fifo":  # after backward: the active queue tensors are views (pipeline.distill.queue)
                queue.enqueue(gather_rows(t_img, env), gather_rows(img_ids, env), gather_rows(t_txt, env),
                              gather_rows(img_ids, env), gather_rows(hashes, env))
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            window_samples += len(idx) * env.world
            bar.update(1)
            if state["global_step"] % cfg.log_every == 0 or state["step_in_epoch"] == steps_per_epoch:
                elapsed = time.perf_counter() - window_t0
                record = {"epoch": epoch, "loss": float(total.detach()), "lr": scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm), "samples_per_s": window_samples / max(elapsed, 1e-9),
                          **{k: float(v.detach()) for k, v in losses.items()}, **info}
                log.log("train", state["global_step"], record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
                window_t0, window_samples = time.perf_counter(), 0
            if cfg.checkpoint_every and state["global_step"] % cfg.checkpoint_every == 0:
                checkpoint(last_path)
        bar.close()
        if state["step_in_epoch"] < steps_per_epoch:  # stopped by max_steps inside the epoch
            checkpoint(last_path)
            break
        # ---- epoch end: balancer window, validation, checkpoints ---------------------------
        balancer.end_window()
        if env.is_main:
            log.log("balancer", state["global_step"], {"epoch": epoch, **{f"w_{k}": v for k, v in balancer.weights.items()}})
        val = {}
        if val_manifest is not None and env.is_main:
            val = validate(model, val_manifest, cfg.eval_batch_size)
            log.log("val", state["global_step"], {"epoch": epoch, **val})
            print(f"epoch {epoch + 1}: val RSUM {val['rsum']:.1f} (i2t R@1 {val['i2t_r1']:.1f}, t2i R@1 {val['t2i_r1']:.1f})")
        # Without a val split the latest epoch counts as best; with one, the highest val RSUM.
        improved = broadcast_object(val_manifest is None or (env.is_main and val["rsum"] > state["best_rsum"]), env)
        if improved:
            state["best_rsum"], state["best_epoch"] = broadcast_object(val.get("rsum", -1.0), env), epoch
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        checkpoint(last_path)
        if improved:
            checkpoint(best_path, {"val": val})
        barrier(env)

    export_path = None
    if env.is_main:
        best = load_checkpoint(best_path if best_path.exists() else last_path)
        model.load_state_dict(best["model"])
        export_path = export_student(model, scfg, paths.student_export(run_dir), meta={
            "teacher_fingerprint": cache.meta.teacher_fingerprint, "dataset": cache.meta.dataset,
            "best_epoch": state["best_epoch"], "best_val_rsum": state["best_rsum"], "run": cfg.name,
        })
        try:  # TorchScript encoders for deployment without this package; optional (tracing limits)
            export_torchscript(model, run_dir / "export")
        except PipelineError as exc:
            print(f"note: no TorchScript export: {exc}")
        log.close()
    barrier(env)
    return TrainResult(run_dir, state["best_rsum"], state["best_epoch"], state["global_step"],
                       time.perf_counter() - started, export_path)
