"""The one training loop. A trainer brings an ``Objective`` (what a batch costs, what else to update, how to
validate); the loop does the rest: AdamW + the LR schedule, the non-finite check, backward, gradient clipping,
progress, logging, checkpoints with every RNG, exact resume, best-epoch keeping and the DDP decisions.

Per step:  objective.step(batch) -> named losses and their total  |  zero_grad, backward, clip, optimizer and
           scheduler step  |  objective.after_step (queue enqueue, EMA update, ...)  |  log, optional checkpoint.
Per epoch: objective.end_epoch (balancer window, ...)  |  objective.validate on the main rank  |  best by
           ``settings.score``  |  checkpoints/last.pt, and best.pt when the score improved.

A checkpoint holds the model, optimizer, scheduler, position, every rank's RNG state and whatever
``objective.state_dict()`` adds, so a resumed run continues bit-for-bit on CPU. Batch order must be a function
of (seed, epoch, position) on the objective's side (``epoch_batches(epoch, start)`` skips what was done).
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from tqdm import tqdm

from pipeline.common import paths
from pipeline.common.distributed import DistEnv, barrier, broadcast_object
from pipeline.common.errors import PipelineError
from pipeline.common.runlog import RunLogger, truncate_after
from pipeline.train.schedule import Schedule
from pipeline.common.kill_switch import kill_self, read_switch
from pipeline.train.state import atomic_save, load_checkpoint, rng_state, set_rng_state


class NonFiniteLoss(PipelineError):
    pass


# Testing switch (pipeline.common.kill_switch): CLIPDISTILL_KILL_AT_STEP=N kills the process once global step N is
# done and written as the loop writes it (after that step's checkpoint, or after the epoch end's validation and
# checkpoints when N ends an epoch), in every trainer (all run through ``fit``).
KILL_SWITCH = "CLIPDISTILL_KILL_AT_STEP"


def _kill_step() -> int | None:
    return read_switch(KILL_SWITCH, "a step number")


def _kill_if_at(kill_step: int | None, step: int) -> None:
    if kill_step == step:
        kill_self()


@dataclass(frozen=True)
class LoopSettings:
    epochs: int
    steps_per_epoch: int
    lr: float
    weight_decay: float
    warmup_steps: int = 0
    decay: str = "cosine"  # pipeline.train.schedule: step | cosine | constant
    decay_epochs: tuple = ()
    decay_factor: float = 0.1
    grad_clip: float = 0.0
    log_every: int = 10
    checkpoint_every: int = 0  # extra checkpoints every N steps (0: at epoch ends only)
    max_steps: int = 0  # stop after this many steps in total (0: all epochs); the schedule does not shrink
    score: str = "rsum"  # the validation key that picks the best epoch (higher is better)
    desc: str = "epoch"
    report_val: bool = True  # print each epoch's validation line
    hint: str = "Try a lower optim.lr."  # added to the non-finite-loss error

    @property
    def total_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps else total

    def schedule(self) -> Schedule:
        return Schedule(max(1, self.epochs * self.steps_per_epoch), self.warmup_steps, self.decay,
                        self.steps_per_epoch, tuple(self.decay_epochs), self.decay_factor)


@dataclass
class StepOutput:
    total: torch.Tensor  # the scalar that is backpropagated
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # named parts, logged
    record: dict[str, Any] = field(default_factory=dict)  # anything else to log for this step
    items: int = 0  # samples this step (per process), for the logged rate


def no_clock(name: str) -> contextlib.AbstractContextManager:
    """The default phase timer: times nothing. Benchmarks pass one that records (bench/bench_distill.py)."""
    return contextlib.nullcontext()


class Objective(ABC):
    """What one kind of training adds to the loop. ``model`` is what the checkpoints call "model"."""

    model: torch.nn.Module
    clock = staticmethod(no_clock)  # phase timer an objective may use inside ``step``

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates (default: the model's trainable parameters)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @abstractmethod
    def epoch_batches(self, epoch: int, start: int) -> Iterable[Any]:
        """The epoch's batches from step ``start`` on (a resumed epoch skips what was done)."""

    @abstractmethod
    def step(self, batch: Any, step: int) -> StepOutput:
        """One batch's named losses and the total that is backpropagated."""

    def after_step(self, out: StepOutput, step: int) -> None:
        """After the optimizer step: queue or EMA updates."""

    def begin(self, log: RunLogger, resumed: bool) -> None:
        """Once, after a resume was restored and before the first step (e.g. validate the start model)."""

    def end_epoch(self, epoch: int, step: int, log: RunLogger) -> None:
        """After an epoch's last step, before validation (e.g. close the balancer's window)."""

    def validate(self) -> Optional[dict]:
        """Validation metrics on the main rank, or None when there is no validation data."""
        return None

    def train_mode(self) -> None:
        self.model.train()

    def state_dict(self) -> dict:
        """Checkpoint entries besides model, optimizer, scheduler, RNG and position."""
        return {}

    def load_state_dict(self, ckpt: dict) -> None:
        pass


@dataclass
class LoopResult:
    run_dir: Path
    best_score: float
    best_epoch: int
    best_val: Optional[dict]
    steps: int
    seconds: float


@dataclass
class TrainResult:
    """What a trainer that exports a model returns (stage 2, adaptation)."""

    run_dir: Path
    best_rsum: float
    best_epoch: int
    steps: int
    seconds: float
    export_path: Optional[Path]


def make_optimizer(objective: Objective, settings: LoopSettings):
    """(AdamW, its LR scheduler, the flat parameter list for clipping) for an objective."""
    groups = objective.parameters()  # parameters, or AdamW parameter groups
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return optimizer, settings.schedule().scheduler(optimizer), params


def clip_gradients(params: list, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``, gradient for gradient, minus its multiply by 1.0 when the norm is
    within the bound (most steps): that multiply rewrites every gradient, about half the clipping's time on a CPU.
    The bound test is torch's own float32 ``max_norm / (norm + 1e-6)``, so a NaN norm still scales (to NaN)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if not bool(max_norm / (norm + 1e-6) >= 1.0):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def train_step(objective: Objective, optimizer, scheduler, params: list, grad_clip: float, batch: Any, step: int,
               clock=no_clock) -> tuple[StepOutput, torch.Tensor]:
    """One optimisation step: the objective's losses, the non-finite check, backward, clipping, optimizer and
    scheduler step, the objective's after-step work. Returns (the step's output, the gradient norm)."""
    out = objective.step(batch, step)
    if not torch.isfinite(out.total):
        bad = {k: float(v.detach()) for k, v in out.losses.items()}
        raise NonFiniteLoss(f"loss became non-finite at step {step}: {bad}")
    with clock("backward"):
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
    with clock("clip + optimizer"):
        grad_norm = clip_gradients(params, grad_clip) if grad_clip > 0 else torch.tensor(math.nan)
        optimizer.step()
        scheduler.step()
    with clock("after step"):
        objective.after_step(out, step)
    return out, grad_norm


def fit(run_dir: Path, objective: Objective, settings: LoopSettings, *, config: Optional[dict] = None,
        resume: bool = False, progress: bool = True, env: DistEnv = DistEnv()) -> LoopResult:
    """Train ``objective.model`` in place (resuming from ``run_dir``'s last checkpoint when asked).

    Seeding is the caller's (before it builds the model). Afterwards the model holds the last step's weights;
    :func:`best_checkpoint` gives the best epoch's.
    """
    started = time.perf_counter()
    kill_step = _kill_step()  # a testing switch (see KILL_SWITCH); checked before anything is written
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    last, best = paths.last_checkpoint(run_dir), paths.best_checkpoint(run_dir)
    model = objective.model
    optimizer, scheduler, params = make_optimizer(objective, settings)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_score": -1.0, "best_epoch": -1,
             "best_val": None}
    if resume:
        ckpt = load_checkpoint(last)  # to host memory: queue and RNG states are host objects
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        objective.load_state_dict(ckpt)
        state = ckpt["state"]
        set_rng_state(ckpt["rng"][env.rank])
        if env.is_main:
            truncate_after(run_dir, state["global_step"], state.get("metrics_records"))
    log = RunLogger(run_dir, active=env.is_main)

    def checkpoint(path: Path, extra: Optional[dict] = None) -> None:
        rngs = [rng_state()]
        if env.enabled:  # every rank's RNG goes into the one file rank 0 writes
            rngs = [None] * env.world
            torch.distributed.all_gather_object(rngs, rng_state())
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), **objective.state_dict(), "rng": rngs,
                   "state": {**state, "metrics_records": log.records},
                   **({"config": config} if config is not None else {}), **(extra or {})}
        if env.is_main:
            atomic_save(payload, path)

    objective.begin(log, resume)
    total_steps, per_epoch = settings.total_steps, settings.steps_per_epoch
    objective.train_mode()
    window_t0, window_items = time.perf_counter(), 0
    try:
        while state["epoch"] < settings.epochs and state["global_step"] < total_steps:
            epoch = state["epoch"]
            bar = tqdm(total=per_epoch, initial=state["step_in_epoch"], unit="step", dynamic_ncols=True,
                       desc=f"{settings.desc} {epoch + 1}/{settings.epochs}", disable=not (progress and env.is_main))
            for batch in objective.epoch_batches(epoch, state["step_in_epoch"]):
                if state["step_in_epoch"] >= per_epoch or state["global_step"] >= total_steps:
                    break
                try:
                    out, grad_norm = train_step(objective, optimizer, scheduler, params, settings.grad_clip, batch,
                                                state["global_step"])
                except NonFiniteLoss as exc:
                    raise NonFiniteLoss(f"{exc} (epoch {epoch + 1}); stopped. Last good checkpoint: "
                                        f"{last if last.exists() else 'none yet'}. {settings.hint}") from None
                state["step_in_epoch"] += 1
                state["global_step"] += 1
                window_items += out.items * env.world
                bar.update(1)
                if state["global_step"] % settings.log_every == 0 or state["step_in_epoch"] == per_epoch:
                    elapsed = time.perf_counter() - window_t0
                    record = {**out.record, "epoch": epoch, "loss": float(out.total.detach()),
                              "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                              "items_per_s": window_items / max(elapsed, 1e-9),
                              **{k: float(v.detach()) for k, v in out.losses.items()}}
                    log.log("train", state["global_step"], record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", ips=f"{record['items_per_s']:.0f}")
                    window_t0, window_items = time.perf_counter(), 0
                if settings.checkpoint_every and state["global_step"] % settings.checkpoint_every == 0:
                    checkpoint(last)
                if state["step_in_epoch"] < per_epoch:  # an epoch's last step is killed after its epoch end
                    _kill_if_at(kill_step, state["global_step"])
            bar.close()
            if state["step_in_epoch"] < per_epoch:  # stopped by max_steps inside the epoch
                checkpoint(last)
                break
            objective.end_epoch(epoch, state["global_step"], log)
            val = objective.validate() if env.is_main else None
            objective.train_mode()
            if val is not None:
                log.log("val", state["global_step"], {"epoch": epoch, **val})
            if val is not None and settings.report_val:
                print(f"{settings.desc} {epoch + 1}: val " + ", ".join(
                    f"{k} {v:.1f}" for k, v in val.items() if k in (settings.score, "i2t_r1", "t2i_r1", "top1")))
            # Without validation the latest epoch counts as best; with it, the highest score (rank 0 decides).
            improved = broadcast_object(val is None or val[settings.score] > state["best_score"], env)
            if improved:
                state["best_score"] = broadcast_object(val[settings.score] if val else -1.0, env)
                state["best_epoch"], state["best_val"] = epoch, val
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            checkpoint(last)
            if improved:
                checkpoint(best, {"val": val or {}})
            barrier(env)
            _kill_if_at(kill_step, state["global_step"])
    finally:
        log.close()
    return LoopResult(run_dir, state["best_score"], state["best_epoch"], state["best_val"], state["global_step"],
                      time.perf_counter() - started)


def best_checkpoint(run_dir: Path) -> dict:
    """The best epoch's checkpoint (the last one when no epoch finished with a validation)."""
    best = paths.best_checkpoint(run_dir)
    return load_checkpoint(best if best.exists() else paths.last_checkpoint(run_dir))


__all__ = ["Objective", "StepOutput", "LoopSettings", "LoopResult", "NonFiniteLoss", "TrainResult", "fit",
           "best_checkpoint", "make_optimizer", "train_step", "no_clock"]
