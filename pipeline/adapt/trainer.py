"""Domain adaptation with few captions: supervised fine-tuning or mean-teacher self-distillation
(method.md section 3).

A pretrained dual encoder (``pipeline.adapt.start.load_start``) is fine-tuned on the labelled fraction of
the training pairs with the symmetric contrastive loss. In ``mean_teacher`` mode an EMA copy of it is the
teacher, and every step also asks the student's similarity distribution of one augmented view of an image
(caption) over a bank of the teacher's caption (image) embeddings to match the teacher's sharper one for
another view. The split is by image: an image is labelled with all its captions, or not at all.

Everything a step reads is a function of (seed, step), so a run resumed from a checkpoint (model, EMA
teacher, optimizer, scheduler, banks, RNG) continues exactly. Run folders follow stage 2
(``pipeline.distill.trainer``): config.json, metrics.jsonl + CSVs + TensorBoard, checkpoints/{last,best}.pt,
export/student.pt (loadable by stage 3), plus split.json with the labelled image ids.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field


import numpy as np
import torch
from torch.utils.data import DataLoader


from pipeline.adapt.consistency import (
    EmbeddingBank, consistency_loss, contrastive_loss, drop_words, ema_update, momentum_at,
)
from pipeline.adapt.data import (
    StepBatches, StepRange, TrainSplit, build_split, decodable_locations, preload_images,
)
from pipeline.adapt.start import TRAINABLE, StartPoint, frozen_towers, load_start, set_trainable
from pipeline.common import config as cfgio
from pipeline.common import paths
from pipeline.common.distributed import resolve_device
from pipeline.common.errors import PipelineError
from pipeline.common.precision import autocast, check_precision
from pipeline.data.loader import worker_start_method
from pipeline.data.manifest import Manifest
from pipeline.retrieval.training_recall import student_recall
from pipeline.students import ImageTransform, StudentModel, export_student, export_torchscript
from pipeline.train.loop import LoopSettings, Objective, StepOutput, TrainResult, best_checkpoint, fit
from pipeline.train.options import TRAINING_PRECISIONS, RunOptions
from pipeline.train.state import one_process_per_run, prepare_run_dir, seed_all

MODES = ("supervised", "mean_teacher")


@dataclass(frozen=True)
class AdaptData:
    manifest_dir: str = "data/openmoji"
    train_split: str = "train"
    val_split: str = "val"  # validated every epoch when its manifest exists
    workers: int = 1
    preload: bool = True  # decode every image once into RAM (downsized); False decodes per step


@dataclass(frozen=True)
class EmaSection:
    m0: float = 0.99  # momentum at step 0, rising on a cosine to m1 at the last step (method.md 3)
    m1: float = 1.0


@dataclass(frozen=True)
class ConsistencySection:
    # Who gets the consistency loss: all (every training image/caption, as in Mean Teacher) | unlabelled
    data: str = "all"
    image_weight: float = 1.0  # images vs the caption bank
    text_weight: float = 1.0  # captions vs the image bank
    student_tau: float = 0.05
    teacher_tau: float = 0.02  # < student_tau: the target is sharper
    bank_size: int = 2048
    bank_min_fill: int = 256  # the loss starts once a bank holds this many embeddings
    rampup_steps: int = 0  # weight rises linearly from 0 over these steps
    word_drop: float = 0.1  # student's caption view: words dropped with this probability


@dataclass(frozen=True)
class AugmentSection:
    crop_scale: tuple = (0.6, 1.0)  # random resized crop of the training views
    hflip: float = 0.0  # off by default: captions name directions ("right arrow")


@dataclass(frozen=True)
class AdaptOptim:
    lr: float = 3e-5
    weight_decay: float = 1e-4
    batch_size: int = 32  # labelled pairs per step
    unlabelled_batch_size: int = 32  # consistency images and captions per step (mean_teacher)
    epochs: int = 3
    steps_per_epoch: int = 0  # 0: training images // batch_size, equal in both modes and every fraction
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine (to 0 at the last step) | constant
    grad_clip: float = 1.0


@dataclass(frozen=True)
class AdaptConfig(RunOptions):
    name: str = "adapt"
    start: str = "student:runs/openmoji-lite/export/student.pt"  # pipeline.adapt.start.load_start
    trainable: str = "all"  # all | projections | text (pipeline.adapt.start.set_trainable)
    mode: str = "mean_teacher"  # mean_teacher | supervised
    labelled_fraction: float = 0.1  # of the training images; their pairs are the labelled data
    tau: float = 0.05  # contrastive temperature on labelled pairs
    contrastive_weight: float = 1.0
    export_model: str = "ema"  # mean_teacher: ema (the teacher) | student; validated and exported
    data: AdaptData = field(default_factory=AdaptData)
    ema: EmaSection = field(default_factory=EmaSection)
    consistency: ConsistencySection = field(default_factory=ConsistencySection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    optim: AdaptOptim = field(default_factory=AdaptOptim)


def check_config(cfg: AdaptConfig) -> None:
    if cfg.mode not in MODES:
        raise PipelineError(f"mode must be one of {MODES}, not {cfg.mode!r}")
    if cfg.export_model not in ("ema", "student"):
        raise PipelineError(f"export_model must be ema or student, not {cfg.export_model!r}")
    if cfg.consistency.data not in ("all", "unlabelled"):
        raise PipelineError(f"consistency.data must be all or unlabelled, not {cfg.consistency.data!r}")
    check_precision(cfg.precision, TRAINING_PRECISIONS)
    if cfg.optim.schedule not in ("cosine", "constant"):
        raise PipelineError(f"optim.schedule must be cosine or constant, not {cfg.optim.schedule!r}")
    if not 0.0 < cfg.labelled_fraction <= 1.0:
        raise PipelineError(f"labelled_fraction must be in (0, 1], got {cfg.labelled_fraction}")
    for key in ("batch_size", "unlabelled_batch_size", "epochs"):
        if getattr(cfg.optim, key) < 1:
            raise PipelineError(f"optim.{key} must be >= 1")
    if cfg.trainable not in TRAINABLE:
        raise PipelineError(f"trainable must be one of {TRAINABLE}, not {cfg.trainable!r}")
    if not 0.0 <= cfg.ema.m0 <= cfg.ema.m1 <= 1.0:
        raise PipelineError(f"ema needs 0 <= m0 <= m1 <= 1, got m0={cfg.ema.m0}, m1={cfg.ema.m1}")
    scale = tuple(cfg.augment.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1 or not 0 <= cfg.augment.hflip <= 1:
        raise PipelineError(f"augment needs crop_scale [lo, hi] with 0 < lo <= hi <= 1 and hflip in [0, 1], "
                            f"got {list(cfg.augment.crop_scale)} and {cfg.augment.hflip}")
    c = cfg.consistency
    if min(cfg.tau, c.student_tau, c.teacher_tau) <= 0:
        raise PipelineError("temperatures must be > 0")
    if not 0 <= c.word_drop < 1:
        raise PipelineError(f"consistency.word_drop must be in [0, 1), got {c.word_drop}")
    if cfg.mode == "mean_teacher" and c.bank_min_fill > c.bank_size:
        raise PipelineError(f"consistency.bank_min_fill {c.bank_min_fill} > bank_size {c.bank_size}: "
                            "the consistency loss would never start")


# ---- the objective ------------------------------------------------------------------------------------


def _train_mode(model: StudentModel) -> None:
    model.train()
    for tower in frozen_towers(model):
        tower.eval()  # no trainable parameter: keep its batch-norm statistics as they are


def _tokens(model: StudentModel, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in model.tokenizer(captions).items()}


def split_for(manifest: Manifest, cfg: AdaptConfig, decodable: set[str] | None = None,
              failures: list[tuple[str, str]] | None = None) -> TrainSplit:
    return build_split(manifest, cfg.labelled_fraction, cfg.seed, cfg.consistency.data,
                       cfg.mode == "mean_teacher", decodable, failures)


def batches_for(split: TrainSplit, transform: ImageTransform, cfg: AdaptConfig,
                images: dict | None = None) -> StepBatches:
    return StepBatches(split, transform, cfg.seed, cfg.optim.batch_size, cfg.optim.unlabelled_batch_size,
                       cfg.mode == "mean_teacher", images)


class AdaptObjective(Objective):
    """Adaptation as an objective of the training loop: the contrastive loss on the labelled pairs and, in
    ``mean_teacher`` mode, the consistency losses against the EMA teacher's banks; after each step the EMA
    update and the bank pushes. Teacher and banks are checkpointed."""

    def __init__(self, cfg: AdaptConfig, start: StartPoint, split: TrainSplit, batches: StepBatches,
                 val_manifest: Manifest | None, device: torch.device, steps_per_epoch: int, total_steps: int):
        self.cfg, self.split, self.device = cfg, split, device
        self.model = model = start.model
        self.val_manifest, self.steps_per_epoch, self.total_steps = val_manifest, steps_per_epoch, total_steps
        self.mean_teacher = cfg.mode == "mean_teacher"
        self.teacher = self.img_bank = self.txt_bank = None
        if self.mean_teacher:
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
            self.img_bank = EmbeddingBank(cfg.consistency.bank_size, model.embed_dim).to(device)
            self.txt_bank = EmbeddingBank(cfg.consistency.bank_size, model.embed_dim).to(device)
        self.evaluated = self.teacher if self.mean_teacher and cfg.export_model == "ema" else model
        self.start_val_rsum = None
        self.batches = batches
        self._iter = None
        self._pushed = None

    def begin(self, log, resumed: bool) -> None:
        if self.val_manifest is not None and not resumed:  # "before adaptation" on the val split
            val = student_recall(self.model, self.val_manifest, self.cfg.eval_batch_size)
            self.start_val_rsum = val["rsum"]
            log.log("val", 0, {"epoch": -1, **val})
            print(f"start: val RSUM {val['rsum']:.1f}")

    def epoch_batches(self, epoch: int, start: int):
        if self._iter is None:  # one stream of steps for the whole run; a step's batch depends on (seed, step)
            first = epoch * self.steps_per_epoch + start
            loader = DataLoader(self.batches, batch_size=None, sampler=StepRange(first, self.total_steps),
                                num_workers=self.cfg.data.workers, pin_memory=self.device.type == "cuda",
                                prefetch_factor=2 if self.cfg.data.workers > 0 else None,
                                multiprocessing_context=worker_start_method() if self.cfg.data.workers > 0 else None,
                                generator=torch.Generator().manual_seed(self.cfg.seed))  # not the global RNG
            self._iter = iter(loader)
        last = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)  # max_steps
        for _ in range(start, last):
            yield next(self._iter)

    def step(self, batch, step: int) -> StepOutput:
        cfg, split, device, c = self.cfg, self.split, self.device, self.cfg.consistency
        model = self.model
        rows = batch["rows"].numpy()
        captions = [split.captions[r] for r in rows]
        pixels = batch["pixels"]
        n_lab = len(rows)
        record: dict = {"failed_images": batch["failed"]}
        if self.mean_teacher:
            u_rows = batch["u_rows"].numpy()
            word_rng = np.random.default_rng([cfg.seed, step, 4])
            u_clean = [split.captions[r] for r in u_rows]
            u_aug = [drop_words(t, c.word_drop, word_rng) for t in u_clean]
            pixels = torch.cat([pixels, batch["u_student"]]) if n_lab else batch["u_student"]
            captions = captions + u_aug
        with autocast(device, cfg.precision):
            s_img, s_txt = model(pixels.to(device, non_blocking=True), _tokens(model, captions, device))
        s_img, s_txt = s_img.float(), s_txt.float()
        img_ids = torch.from_numpy(split.image_ids[split.row_image[rows]]).to(device)
        hashes = torch.from_numpy(split.caption_hash[rows]).to(device)
        losses, total = {}, s_img.new_zeros(())
        record["contrastive"] = math.nan
        if n_lab:  # zero only if every labelled image of the step failed to decode
            losses["contrastive"] = contrastive_loss(s_img[:n_lab], s_txt[:n_lab], img_ids, cfg.tau, hashes)
            total = cfg.contrastive_weight * losses["contrastive"]
        if self.mean_teacher:
            with torch.no_grad(), autocast(device, cfg.precision):
                t_img = self.teacher.encode_image(batch["u_teacher"].to(device, non_blocking=True)).float()
                t_txt = self.teacher.encode_text(_tokens(self.teacher, u_clean, device)).float()
            ramp = min(1.0, (step + 1) / c.rampup_steps) if c.rampup_steps else 1.0
            for name, s_part, t_part, bank, weight in (
                    ("image_consistency", s_img[n_lab:], t_img, self.txt_bank, c.image_weight),
                    ("text_consistency", s_txt[n_lab:], t_txt, self.img_bank, c.text_weight)):
                # Same keys on every record (the CSV header is the first record's); NaN until active.
                keys = (name, f"{name}_teacher_entropy", f"{name}_agreement")
                record.update(dict.fromkeys(keys, math.nan))
                if weight > 0 and len(bank) >= c.bank_min_fill and len(s_part):
                    loss, info = consistency_loss(s_part, t_part, bank.active(), c.student_tau, c.teacher_tau)
                    losses[name] = loss
                    total = total + ramp * weight * loss
                    record.update({f"{name}_{k}": v for k, v in info.items()})
            record.update(momentum=momentum_at(step, self.total_steps, cfg.ema.m0, cfg.ema.m1), ramp=ramp)
            self._pushed = (t_img, t_txt, record["momentum"])
        return StepOutput(total, losses, record, items=len(pixels))

    def after_step(self, out: StepOutput, step: int) -> None:
        if self._pushed is not None:
            t_img, t_txt, momentum = self._pushed
            ema_update(self.teacher, self.model, momentum)
            self.img_bank.push(t_img)
            self.txt_bank.push(t_txt)
        self._pushed = None

    def validate(self):
        if self.val_manifest is None:
            return None
        return student_recall(self.evaluated, self.val_manifest, self.cfg.eval_batch_size)

    def train_mode(self) -> None:
        _train_mode(self.model)

    def state_dict(self) -> dict:
        extra = {"start_val_rsum": self.start_val_rsum}
        if self.mean_teacher:
            extra.update(teacher=self.teacher.state_dict(), image_bank=self.img_bank.state_dict(),
                         text_bank=self.txt_bank.state_dict())
        return extra

    def load_state_dict(self, ckpt: dict) -> None:
        self.start_val_rsum = ckpt.get("start_val_rsum")
        if self.mean_teacher:
            self.teacher.load_state_dict(ckpt["teacher"])
            self.img_bank.load_state_dict(ckpt["image_bank"])
            self.txt_bank.load_state_dict(ckpt["text_bank"])


@one_process_per_run
def train(cfg: AdaptConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run (or resume) one adaptation run; returns where it went and how it did."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise PipelineError("adapt runs in a single process (no torchrun)")
    check_config(cfg)
    started = time.perf_counter()
    device = torch.device(resolve_device(cfg.device))
    run_dir = prepare_run_dir(cfg, resume)
    cfgio.save(cfg, run_dir / "config.json")
    seed_all(cfg.seed)

    # ---- start model, data --------------------------------------------------------------------------
    start: StartPoint = load_start(cfg.start, device)
    model = start.model
    counts = set_trainable(model, cfg.trainable)
    train_manifest = _read_split(cfg, cfg.data.train_split, required=True)
    val_manifest = _read_split(cfg, cfg.data.val_split, required=False)
    _, image_paths = train_manifest.unique_images()
    locations = [train_manifest.resolve(p) for p in image_paths]
    size = model.transform_settings.size
    if cfg.data.preload:
        images, failures = preload_images(locations, int(size * 1.15))
        decodable = set(images)
    else:
        images, (decodable, failures) = {}, decodable_locations(locations)
    split = split_for(train_manifest, cfg, decodable, failures)
    settings = dataclasses.replace(model.transform_settings, train_scale=tuple(cfg.augment.crop_scale),
                                   hflip=cfg.augment.hflip)
    batches = batches_for(split, ImageTransform(settings, train=True), cfg, images)
    steps_per_epoch = cfg.optim.steps_per_epoch or max(1, len(split.image_ids) // cfg.optim.batch_size)
    loop = LoopSettings(
        epochs=cfg.optim.epochs, steps_per_epoch=steps_per_epoch, lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_steps, decay=cfg.optim.schedule,
        grad_clip=cfg.optim.grad_clip, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
        max_steps=cfg.max_steps, score="rsum", desc="epoch")
    (run_dir / "split.json").write_text(json.dumps(
        {**split.summary(), "labelled_fraction": cfg.labelled_fraction, "seed": cfg.seed,
         "labelled_image_ids": split.labelled_ids.tolist(), "undecodable": split.failures[:20]}, indent=1))
    objective = AdaptObjective(cfg, start, split, batches, val_manifest, device, steps_per_epoch,
                               loop.total_steps)
    print(f"run {run_dir}: start {start.spec} ({start.kind}), mode {cfg.mode}, trainable {cfg.trainable} "
          f"({counts['trainable'] / 1e6:.1f}M of {counts['total'] / 1e6:.1f}M params); {split.summary()}; "
          f"{steps_per_epoch} steps/epoch x {cfg.optim.epochs} epochs, device {device}")
    if failures:
        print(f"note: {len(failures)} training images could not be decoded and are skipped "
              f"(first: {failures[0][0]}: {failures[0][1]})")
    result = fit(run_dir, objective, loop, config=cfgio.to_dict(cfg), resume=resume, progress=progress)

    best = best_checkpoint(run_dir)
    exported_ema = objective.evaluated is objective.teacher
    out_model = copy.deepcopy(model).cpu()
    out_model.load_state_dict(best["teacher"] if exported_ema else best["model"])
    meta = {**start.meta, "run": cfg.name, "start": cfg.start, "mode": cfg.mode,
            "labelled_fraction": cfg.labelled_fraction, "exported": "ema" if exported_ema else "student",
            "best_epoch": result.best_epoch, "best_val_rsum": result.best_score,
            "start_val_rsum": objective.start_val_rsum,
            **{f"split_{k}": v for k, v in split.summary().items()}}
    export_path = export_student(out_model, None, paths.student_export(run_dir), meta=meta)
    try:  # TorchScript encoders, as stage 2 writes them; optional (tracing limits)
        export_torchscript(out_model, run_dir / "export")
    except PipelineError as exc:
        print(f"note: no TorchScript export: {exc}")
    return TrainResult(run_dir, result.best_score, result.best_epoch, result.steps,
                       time.perf_counter() - started, export_path)


def _read_split(cfg: AdaptConfig, split: str, required: bool) -> Manifest | None:
    path = paths.manifest_path(cfg.data.manifest_dir, split)
    if not path.exists():
        if required:
            raise PipelineError(f"no {split} manifest at {path}; build it first (`make dataset`)")
        return None
    return Manifest.read(path)


__all__ = ["AdaptConfig", "AdaptData", "AdaptOptim", "AugmentSection", "ConsistencySection", "EmaSection",
           "MODES", "check_config", "train"]
