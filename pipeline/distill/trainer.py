"""Stage 2: distil a student from cached teacher targets (method.md section 1).

``DistillObjective`` is what stage 2 adds to the one training loop (``pipeline.train.loop``): per step, gather
targets from the memory-mapped cache, run the student, compute the enabled multiscale losses against the
negative queue and balance them; after the step, enqueue; per epoch, close the balancer window. The loop
validates (Recall@K/RSUM on the val split), checkpoints and keeps the best epoch; ``train`` exports it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.common import config as cfgio
from pipeline.common import paths
from pipeline.common.distributed import DistEnv, barrier, gather_rows, init_from_env, resolve_device, shutdown
from pipeline.common.errors import PipelineError
from pipeline.common.precision import autocast, check_precision
from pipeline.distill.balancer import make_balancer
from pipeline.distill.data import (
    EpochOrder, PairDataset, ViewReplay, align, check_teacher_norms, gather_targets, make_loader, teacher_targets,
)
from pipeline.distill.losses import TEACHER_FREE_LOSSES, LossConfig, MultiscaleDistillLoss
from pipeline.distill.transfer import (
    TransferStream, load_transfer_data, transfer_batch_size,
)
from pipeline.features.views import student_view_transform
from pipeline.distill.queue import NegativeQueue, QueueBatch
from pipeline.data.manifest import Manifest
from pipeline.features.cache import open_cached_split
from pipeline.retrieval.training_recall import student_recall
from pipeline.students import StudentConfig, build_student, export_student, export_torchscript, get_preset
from pipeline.students.inherit import keep_text_side, with_text_side_of
from pipeline.students.preprocess import MemoTokenizer
from pipeline.train.loop import LoopSettings, Objective, StepOutput, TrainResult, best_checkpoint, fit
from pipeline.train.options import TRAINING_PRECISIONS, RunOptions
from pipeline.train.state import one_process_per_run, prepare_run_dir, seed_all


@dataclass(frozen=True)
class DataSection:
    manifest_dir: str = "data/openmoji"
    # Holds one folder per split. Empty: no teacher; only teacher-free losses (losses.pair) may be on. This is
    # how the strong teacher itself is trained (configs/teacher-emoji.yaml), and a pairs-only baseline.
    cache_dir: str = "artifacts/cache/openmoji/lit"
    train_split: str = "train"
    val_split: str = "val"  # validated every epoch when its manifest and cache exist
    workers: int = 1
    preload: bool = True  # decode every image once into RAM; False streams from disk (same pixels either way)
    # Preload only while the images' upper-bound size fits this many GiB; larger sets stream from disk (COCO's
    # 118k images at a 224 px student would need ~31 GiB). Only speed depends on it, never the results.
    preload_limit_gb: float = 4.0
    # False: train against the teacher's raw (un-normalised) embeddings, the paper's ablation (method.md 1.6);
    # needs a cache that stores the norms.
    teacher_normalized: bool = True
    # Transfer data (pipeline.distill.transfer): caption-less images and image-less captions distilled next to
    # the pairs, in the intra-modal terms. Sources: [{manifest_dir, cache_dir, split, images: true, captions:
    # false}] (every cached image / caption of the split) plus the training manifest's own unpaired rows; each
    # step adds round(transfer_ratio x batch_size) images and as many captions (when there are such captions).
    transfer: tuple = ()
    transfer_ratio: float = 0.0
    # Cached augmented views (teacher-features --views K): each image replays one of the first `views` cached
    # crops per epoch, and its target is the teacher's embedding of that crop. 0: the student's own random
    # augmentation against the teacher's embedding of the whole image.
    views: int = 0


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
    # A floor of optimiser steps: a dataset too small to reach it in `epochs` trains for more epochs, with the
    # decay points moved in proportion (schedule_for), so small datasets are not undertrained. 0: off.
    min_steps: int = 0


@dataclass(frozen=True)
class InheritSection:
    """Weight inheritance (pipeline.students.inherit): the student's text tower from a trained dual encoder's."""

    text_from: str = ""  # a dual-encoder export (e.g. artifacts/teachers/emoji-strong.pt); empty: off
    text_layers: tuple = ()  # the source's layers, one per student layer; empty: evenly spaced
    text_projection: bool = True  # also its text projection (same width as the student's)


@dataclass(frozen=True)
class DistillConfig(RunOptions):
    name: str = "default"
    student: str = "lite"  # preset name (pipeline.students.PRESETS)
    student_overrides: dict = field(default_factory=dict)  # merged into the preset's config
    data: DataSection = field(default_factory=DataSection)
    losses: LossConfig = field(default_factory=LossConfig)
    queue: QueueSection = field(default_factory=QueueSection)
    balancer: BalancerSection = field(default_factory=BalancerSection)
    optim: OptimSection = field(default_factory=OptimSection)
    inherit: InheritSection = field(default_factory=InheritSection)
    # The teacher's text side (NVIDIA's clip-distillation): the teacher that made the cache, as a spec (dual:PATH or a
    # bare export path, lit[:CKPT], openclip:ARCH[/TAG|/CKPT|/DIR]). The student keeps its text tower and projection,
    # frozen, and trains only its image tower into the teacher's space against the cached caption embeddings (no
    # text forward); its export carries that text side, so eval, search and export-onnx work unchanged. Empty: the
    # student trains its own text tower.
    teacher_text: str = ""


CAPTION_SALT = 0x63617074  # the transfer captions' stream is not the images' (pipeline.distill.transfer)


def student_config(cfg: DistillConfig, width: int | None) -> StudentConfig:
    """The preset with the run's overrides; ``width`` (the teacher's, None without a teacher) wins."""
    base = get_preset(cfg.student, embed_dim=width or 512).to_dict()
    cfgio.deep_merge(base, dict(cfg.student_overrides))
    if width is not None:
        base["embed_dim"] = width  # the student always projects to the teacher's width
    return StudentConfig.from_dict(base)


def schedule_for(optim: OptimSection, steps_per_epoch: int) -> tuple[int, tuple[int, ...]]:
    """(epochs, decay epochs) of a run: as configured, or stretched to reach ``optim.min_steps`` steps."""
    epochs, decay = optim.epochs, tuple(optim.decay_epochs)
    if optim.min_steps <= 0 or epochs * steps_per_epoch >= optim.min_steps:
        return epochs, decay
    stretched = math.ceil(optim.min_steps / steps_per_epoch)
    return stretched, tuple(max(1, round(d * stretched / epochs)) for d in decay)


def teacher_free(losses: LossConfig) -> bool:
    """True when no enabled loss reads teacher targets (so the run needs no cache)."""
    return set(losses.enabled) <= set(TEACHER_FREE_LOSSES)


def export_reads_teacher(meta: dict) -> bool:
    """Whether a student export's recorded losses read its teacher's targets (stage 3 passes this to its
    foreign-export checks); an export without a recorded recipe counts as reading them."""
    recipe = meta.get("recipe") or {}
    return "losses" not in recipe or not teacher_free(cfgio.from_dict(LossConfig, recipe["losses"]))


@one_process_per_run
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
    check_precision(cfg.precision, TRAINING_PRECISIONS)
    if cfg.queue.mode not in ("fifo", "random"):
        raise PipelineError(f"queue.mode must be fifo or random, not {cfg.queue.mode!r}")
    seed_all(cfg.seed + env.rank)
    objective = DistillObjective(cfg, run_dir, device, env)
    epochs, decay_epochs = schedule_for(cfg.optim, objective.steps_per_epoch)
    settings = LoopSettings(
        epochs=epochs, steps_per_epoch=objective.steps_per_epoch, lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_steps, decay="step",
        decay_epochs=decay_epochs, decay_factor=cfg.optim.decay_factor,
        grad_clip=cfg.optim.grad_clip, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
        max_steps=cfg.max_steps, score="rsum", desc="epoch", hint="Try a lower optim.lr or precision=fp32.")
    if env.is_main:
        o = objective
        teacher = f"{o.rows.dropped} without cached targets" if o.cache else "no teacher"
        print(f"run {run_dir}: {len(o.rows)} pairs ({teacher}), "
              f"{o.steps_per_epoch} steps/epoch x {epochs} epochs"
              f"{f' (stretched from {cfg.optim.epochs} to reach optim.min_steps={cfg.optim.min_steps})' if epochs != cfg.optim.epochs else ''}"
              f", student {o.scfg.name} "
              f"(init {o.scfg.init}) "
              f"-> width {o.scfg.embed_dim}, losses {list(o.criterion.names)}, balancer {cfg.balancer.kind}, "
              f"device {device}")
    for pool, stream, what, where in ((objective.transfer, objective.stream, "caption-less images", "image"),
                                      (objective.captions, objective.caption_stream, "image-less captions", "text")):
        if env.is_main and pool is not None:
            skipped = getattr(pool, "skipped_paired", 0)
            sources = ", ".join(f"{name} {n}" for name, n in pool.per_source)
            print(f"transfer: {len(pool)} {what} ({sources}{f'; {skipped} already pairs, skipped' if skipped else ''}"
                  f"), {stream.per_step} per step in the {where}-only losses and the {where} queue")
    if env.is_main:
        print(f"images: {objective.dataset.preload_summary}")
    if env.is_main and objective.views is not None:
        print(f"views: each image replays one of the first {objective.views.count} of the cache's "
              f"{objective.cache.view_count} cached teacher views per epoch (its own random augmentation is off)")
    unused = [f"{n} {what}" for n, what, pool in (
        (objective.rows.image_only, "image-only", objective.transfer),
        (objective.rows.caption_only, "caption-only", objective.captions)) if n and pool is None]
    if env.is_main and unused:
        print(f"note: the manifest's {' and '.join(unused)} rows are not used: set data.transfer_ratio > 0 to "
              "distil on them next to the pairs")
    if env.is_main and objective.scfg.init == "random":
        print(f"note: student {objective.scfg.name} starts from random weights (init: random), not its "
              "pretrained ones")
    result = fit(run_dir, objective, settings, config=cfgio.to_dict(cfg), resume=resume, progress=progress,
                 env=env)

    export_path = None
    if env.is_main:
        model = objective.model
        model.load_state_dict(best_checkpoint(run_dir)["model"])
        cache = objective.cache
        export_path = export_student(model, objective.scfg, paths.student_export(run_dir), meta={
            "teacher_fingerprint": cache.meta.teacher_fingerprint if cache else None,
            "dataset": cache.meta.dataset if cache else Path(cfg.data.manifest_dir).name,
            "best_epoch": result.best_epoch, "best_val_rsum": result.best_score, "run": cfg.name,
            "student_init": objective.scfg.init,
            # what made it: the whole run config and the training manifest's content hash (a teacher trained
            # this way is identified by these, and its weights, in every cache built from it)
            "recipe": cfgio.to_dict(cfg), "train_data": objective.data_fingerprint,
            **({"text_side": objective.text_side} if objective.text_side else {}),
        })
        try:  # TorchScript encoders for deployment without this package; optional (tracing limits)
            export_torchscript(model, run_dir / "export")
        except PipelineError as exc:
            print(f"note: no TorchScript export: {exc}")
    barrier(env)
    return TrainResult(run_dir, result.best_score, result.best_epoch, result.steps,
                       time.perf_counter() - started, export_path)


class DistillObjective(Objective):
    """Stage 2 as an objective of the training loop (method.md 1): per step, gather the targets from the
    memory-mapped cache, run the student, the enabled multiscale losses against the negative queue, the
    balancer; after the step, enqueue the teacher targets. Queue and balancer are checkpointed."""

    def __init__(self, cfg: DistillConfig, run_dir: Path, device: torch.device, env: DistEnv):
        self.cfg, self.device, self.env = cfg, device, env
        # ---- data: manifest rows aligned to cached teacher targets (or the bare pairs: no teacher) -----------
        if cfg.data.cache_dir:
            train_manifest, self.cache = open_cached_split(cfg.data.manifest_dir, cfg.data.cache_dir,
                                                           cfg.data.train_split, required=True)
            self.val_manifest, _ = open_cached_split(cfg.data.manifest_dir, cfg.data.cache_dir, cfg.data.val_split,
                                                     required=False)
            check_teacher_norms(self.cache, cfg.data.teacher_normalized)
        else:
            if not teacher_free(cfg.losses):
                needs = sorted(set(cfg.losses.enabled) - set(TEACHER_FREE_LOSSES))
                raise PipelineError(f"losses {needs} need teacher targets: set data.cache_dir to a teacher-features "
                                    f"cache, or train on the pairs alone (only {list(TEACHER_FREE_LOSSES)} on)")
            self.cache = None
            train_manifest = Manifest.read(paths.manifest_path(cfg.data.manifest_dir, cfg.data.train_split))
            val_path = paths.manifest_path(cfg.data.manifest_dir, cfg.data.val_split)
            self.val_manifest = Manifest.read(val_path) if val_path.exists() else None
        self.data_fingerprint = train_manifest.content_hash
        self.rows = rows = align(train_manifest, self.cache)
        self.transfer, self.stream, self.captions, self.caption_stream = self._transfer(train_manifest)
        self.scfg = student_config(cfg, self.cache.width if self.cache else None)
        source, source_fingerprint = self._teacher_text_side() if cfg.teacher_text else (None, None)
        if source is not None:
            self.scfg = with_text_side_of(self.scfg, source)
        self.model = model = build_student(self.scfg, tokenizer=source.tokenizer if source else None).to(device)
        self.inherited = self._inherit(model, cfg.inherit)
        self.tokenize = MemoTokenizer(model.tokenizer)  # each caption tokenized once, not once an epoch
        self.text_side = None
        if source is not None:
            frozen = keep_text_side(model, source)
            self.text_side = {"from": cfg.teacher_text, "fingerprint": source_fingerprint, "frozen": frozen}
            if env.is_main:
                print(f"text side: the teacher's ({cfg.teacher_text}), {frozen / 1e6:.1f}M parameters frozen; "
                      "only the image tower trains, against the cached caption embeddings")
        self.views = self._views()
        if cfg.data.preload_limit_gb < 0:
            raise PipelineError(f"data.preload_limit_gb must be >= 0, got {cfg.data.preload_limit_gb}")
        self.dataset = PairDataset(rows, model.image_transform(train=True), cfg.seed, preload=cfg.data.preload,
                                   preload_size=int(self.scfg.image_size * 1.15), transfer=self.transfer,
                                   stream=self.stream, views=self.views,
                                   preload_limit=int(cfg.data.preload_limit_gb * 2**30),
                                   channels_last=self.scfg.channels_last)
        self.sampler = EpochOrder(len(rows), cfg.seed, env.rank, env.world)
        self.steps_per_epoch = len(self.sampler) // cfg.optim.batch_size
        if self.steps_per_epoch == 0:
            raise PipelineError(f"{len(self.sampler)} training rows per process < batch size {cfg.optim.batch_size}")
        self.loader = make_loader(self.dataset, self.sampler, cfg.optim.batch_size, cfg.data.workers, cfg.seed,
                                  device.type == "cuda")
        # ---- losses, queue, balancer -----------------------------------------------------------------------
        self.criterion = MultiscaleDistillLoss(cfg.losses)
        self.queue = None  # the queue holds teacher targets: none without a teacher
        if self.cache is not None:
            self.queue = NegativeQueue.create(run_dir / "queue" / f"rank{env.rank}", cfg.queue.size,
                                              self.cache.width, with_hash=True, dtype=cfg.queue.dtype)
        b = cfg.balancer
        self.balancer = make_balancer(b.kind, self.criterion.names, temperature=b.temperature,
                                      window_steps=b.window_steps, ema=b.ema, weights=b.weights)
        self.ddp_model = model
        if env.enabled:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self._global_step = 0

    def _transfer(self, train_manifest: Manifest):
        """(image pool, its stream, caption pool, its stream); Nones when transfer_ratio is 0 or a pool is
        empty."""
        cfg = self.cfg
        per_step = transfer_batch_size(cfg.data.transfer_ratio, cfg.optim.batch_size)
        if per_step == 0:
            return None, None, None, None
        if self.cache is None:
            raise PipelineError("data.transfer_ratio > 0 needs a teacher cache (data.cache_dir): transfer images "
                                "learn from the teacher's image embeddings alone")
        if not set(self.cfg.losses.enabled) - set(TEACHER_FREE_LOSSES):
            raise PipelineError("data.transfer_ratio > 0 needs a distillation loss on (cd, fd, sd or hnd): the "
                                "pair loss cannot use caption-less images")
        own = (train_manifest, self.cache)
        pool, captions = load_transfer_data(cfg.data.transfer, own, self.rows.locations)
        if captions is not None and cfg.teacher_text:
            if self.env.is_main:  # a frozen text side has nothing to learn from them
                print(f"note: {len(captions)} image-less transfer captions are not used: the student's text side "
                      "is the teacher's (teacher_text)")
            captions = None
        if pool is None and captions is None:
            raise PipelineError("data.transfer_ratio > 0 but there is no transfer data: name sources in "
                                "data.transfer or declare unpaired rows in the training manifest")
        env, seed = self.env, self.cfg.seed
        return (pool, TransferStream(len(pool), per_step, seed, env.rank, env.world) if pool else None,
                captions, TransferStream(len(captions), per_step, seed, env.rank, env.world, salt=CAPTION_SALT)
                if captions else None)

    def _teacher_text_side(self):
        """(the cache's own teacher as a student model whose text side the student keeps, its fingerprint); a
        one-line error when it is not what made the cache, since the cached caption embeddings stand in for its text
        forward. ``dual:``, ``lit`` and ``openclip:`` teachers (``pipeline.students.from_teacher``); a bare path is
        a dual encoder export."""
        from pipeline.students.from_teacher import teacher_as_student
        from pipeline.teachers import BACKENDS

        cfg = self.cfg
        if self.cache is None:
            raise PipelineError("teacher_text needs the teacher's cache (data.cache_dir): its caption embeddings are "
                                "the student's text side in training")
        if cfg.inherit.text_from:
            raise PipelineError("teacher_text and inherit.text_from both set the text tower: choose one")
        spec = cfg.teacher_text if cfg.teacher_text.partition(":")[0] in BACKENDS else f"dual:{cfg.teacher_text}"
        model, fingerprint_of = teacher_as_student(spec)
        fingerprint = fingerprint_of()  # hashes every weight: once
        if fingerprint != self.cache.meta.teacher_fingerprint:
            raise PipelineError(f"teacher_text {cfg.teacher_text} is teacher {fingerprint}, but the cache "
                                f"{cfg.data.cache_dir} was made by {self.cache.meta.teacher_fingerprint}")
        return model, fingerprint

    def _inherit(self, model, section: InheritSection) -> dict | None:
        """The student's text tower from a trained dual encoder's (TinyCLIP's weight inheritance); a resumed run's
        checkpoint then replaces these weights like any initial ones."""
        if not section.text_from:
            return None
        from pipeline.students.export import load_student_model
        from pipeline.students.inherit import inherit_text_layers

        source = load_student_model(section.text_from)[0]
        taken = inherit_text_layers(model, source, section.text_layers, section.text_projection)
        if self.env.is_main:
            print(f"text tower: layers {taken['layers']} of {taken['of']} of {section.text_from}"
                  + (" and its projection" if taken["projection"] else ""))
        return {"from": section.text_from, **taken}

    def _views(self) -> ViewReplay | None:
        """The cached views to replay (data.views > 0), checked against the caches."""
        k, cache = self.cfg.data.views, self.cache
        if k == 0:
            return None
        if k < 0:
            raise PipelineError(f"data.views must be >= 0, got {k}")
        if cache is None or cache.view_count < k:
            held = f"holds {cache.view_count} views per image" if cache is not None else "is not set (no teacher)"
            raise PipelineError(f"data.views={k}, but the cache {held}: build it with teacher-features --views {k} "
                                "(or more)")
        if not self.cfg.data.teacher_normalized:
            raise PipelineError("data.views needs normalised targets (data.teacher_normalized: true): views are "
                                "cached without their norms")
        return ViewReplay(student_view_transform(self.model.transform_settings), k,
                          cache.view_params[self.rows.image_rows, :k],
                          self.transfer.view_params(k) if self.transfer is not None else None)

    def parameters(self):
        return list(self.model.parameters())  # AdamW skips the frozen ones (no gradient)

    def _refill_queue(self, step: int) -> None:
        cfg, rows = self.cfg, self.rows

        def sample(n: int) -> QueueBatch:
            pick = np.random.default_rng([cfg.seed, step, n]).integers(0, len(rows), n)
            img, txt = gather_targets(self.cache, rows.image_rows[pick], rows.text_rows[pick],
                                      cfg.data.teacher_normalized)
            return QueueBatch(img=img, img_ids=rows.image_ids[pick], txt=txt, txt_ids=rows.image_ids[pick],
                              txt_hash=rows.caption_hash[pick])
        self.queue.refill_random(sample)

    def epoch_batches(self, epoch: int, start: int):
        q = self.cfg.queue
        self.sampler.set_epoch(epoch, start=start * self.cfg.optim.batch_size)
        if self.queue is not None and q.mode == "random" and start == 0 and not q.refill_every:
            self._refill_queue(epoch * self.steps_per_epoch)
        return self.loader

    def targets(self, idx: np.ndarray, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's embeddings of the batch rows, from the cache (a benchmark swaps in an online teacher);
        (None, None) without a teacher (only teacher-free losses are on then)."""
        if self.cache is None:
            return None, None
        views = batch.views[:len(idx)] if self.views is not None else None
        return teacher_targets(self.cache, self.rows, idx, self.device, self.cfg.data.teacher_normalized, views)

    def step(self, batch, step: int) -> StepOutput:
        cfg, rows, device, clock = self.cfg, self.rows, self.device, self.clock
        if (self.queue is not None and cfg.queue.mode == "random" and cfg.queue.refill_every
                and step % cfg.queue.refill_every == 0):
            self._refill_queue(step)
        idx = batch.rows.numpy()
        with clock("targets"):
            t_img, t_txt = self.targets(idx, batch)
        extra_caps = None
        if self.captions is not None:  # this step's transfer captions: a pure function of the step (resume)
            crows = self.caption_stream.rows(self.caption_stream.positions(step))
            extra_caps = (crows, [self.captions.captions[r] for r in crows])
        with clock("tokenize"):
            img_ids = torch.from_numpy(rows.image_ids[idx]).to(device)
            hashes = torch.from_numpy(rows.caption_hash[idx]).to(device)
            texts = batch.captions + (extra_caps[1] if extra_caps else [])
            # the teacher's text side: no text forward, the cached caption embeddings are what it computes
            tokens = None if self.text_side else {k: v.to(device) for k, v in self.tokenize(texts).items()}
        transfer = None
        if self.transfer is not None and len(batch.transfer_rows):
            with clock("targets"):
                trows = batch.transfer_rows.numpy()
                tviews = batch.views[len(idx):] if self.views is not None else None
                transfer = (torch.from_numpy(self.transfer.targets(trows, tviews)).to(device, non_blocking=True),
                            torch.from_numpy(self.transfer.ids_of(trows)).to(device))
        with clock("forward"), autocast(device, cfg.precision):
            # one forward over the pairs' and the transfer images (one DDP call); split after
            s_all, s_txt_all = self.ddp_model(batch.pixels.to(device, non_blocking=True), tokens)
        s_img = s_all[:len(idx)]
        s_txt = torch.nn.functional.normalize(t_txt.float(), dim=-1) if self.text_side else s_txt_all[:len(idx)]
        transfer_text = None
        if extra_caps:
            crows = extra_caps[0]
            transfer_text = (s_txt_all[len(idx):].float(),
                             torch.from_numpy(self.captions.targets(crows)).to(device, non_blocking=True),
                             torch.from_numpy(self.captions.ids_of(crows)).to(device),
                             torch.from_numpy(self.captions.hashes[crows]).to(device))
        with clock("losses"):
            losses = self.criterion(s_img.float(), s_txt.float(), t_img, t_txt, img_ids,
                                    queue=self.queue.active(device) if self.queue else None,
                                    captions_hash=hashes,
                                    transfer=(s_all[len(idx):].float(), *transfer) if transfer else None,
                                    transfer_text=transfer_text)
        with clock("balancer"):
            total, info = self.balancer(losses)
        q_img, q_ids = t_img, img_ids
        if transfer:  # transfer images are image negatives too
            q_img, q_ids = torch.cat([t_img, transfer[0]]), torch.cat([img_ids, transfer[1]])
        q_txt, q_txt_ids, q_hash = t_txt, img_ids, hashes
        if transfer_text:  # and transfer captions text negatives
            q_txt, q_txt_ids, q_hash = (torch.cat([t_txt, transfer_text[1]]), torch.cat([img_ids, transfer_text[2]]),
                                        torch.cat([hashes, transfer_text[3]]))
        self._pending = (q_img, q_ids, q_txt, q_txt_ids, q_hash)
        return StepOutput(total, losses, info, items=len(idx) + (len(transfer[0]) if transfer else 0))

    def after_step(self, out: StepOutput, step: int) -> None:
        if self.queue is not None and self.cfg.queue.mode == "fifo":  # after backward: the active queue tensors are views (pipeline.distill.queue)
            q_img, q_ids, t_txt, txt_ids, hashes = self._pending
            env = self.env
            self.queue.enqueue(gather_rows(q_img, env), gather_rows(q_ids, env), gather_rows(t_txt, env),
                               gather_rows(txt_ids, env), gather_rows(hashes, env))
        self._pending = None

    def end_epoch(self, epoch: int, step: int, log) -> None:
        self.balancer.end_window()
        log.log("balancer", step, {"epoch": epoch, **{f"w_{k}": v for k, v in self.balancer.weights.items()}})

    def validate(self):
        if self.val_manifest is None:
            return None
        return student_recall(self.model, self.val_manifest, self.cfg.eval_batch_size)

    def state_dict(self) -> dict:
        own = (self.queue.state_dict() if self.queue is not None else None, self.balancer.state_dict())
        states = [own]
        if self.env.enabled:  # every rank's queue and balancer (fed by its own losses) go into rank 0's file
            states = [None] * self.env.world
            torch.distributed.all_gather_object(states, own)
        return {"queue": [q for q, _ in states], "balancers": [b for _, b in states],
                "student_config": self.scfg.to_dict()}

    def load_state_dict(self, ckpt: dict) -> None:
        if self.queue is not None:
            self.queue.load_state_dict(ckpt["queue"][self.env.rank])
        balancers = ckpt.get("balancers") or [ckpt["balancer"]]  # older checkpoints: rank 0's only
        self.balancer.load_state_dict(balancers[self.env.rank] if self.env.rank < len(balancers) else balancers[0])
