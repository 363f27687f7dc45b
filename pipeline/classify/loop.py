"""One epoch loop shared by the head, the probe and every student generation.

Conventions of stage 2 (``pipeline.distill.trainer``): a run folder with ``metrics.jsonl`` + per-kind CSVs, and
``checkpoints/last.pt`` (model, optimizer, scheduler, every RNG, position) at each epoch end and
``best.pt`` at each best validation top-1. The batch order is a function of (seed, epoch) and a resumed
epoch skips the batches already done, so a resumed run continues exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from pipeline.common.errors import PipelineError
from pipeline.common.runlog import RunLogger, truncate_after
from pipeline.train.schedule import Schedule
from pipeline.train.state import atomic_save, load_checkpoint, rng_state, seed_all, set_rng_state
from pipeline.common import paths


@dataclass(frozen=True)
class LoopSettings:
    epochs: int
    steps_per_epoch: int
    lr: float
    weight_decay: float
    seed: int
    warmup_steps: int = 0
    grad_clip: float = 0.0
    log_every: int = 10
    max_steps: int = 0  # stop after this many steps (0: all epochs)
    desc: str = "train"


@dataclass
class LoopResult:
    best_epoch: int
    best_val: Optional[dict]
    steps: int
    seconds: float




def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def fit(
    run_dir: Path,
    model: torch.nn.Module,
    settings: LoopSettings,
    batches: Callable[[int, int], Iterator[Any]],
    loss_fn: Callable[[Any], torch.Tensor],
    evaluate: Optional[Callable[[], dict]] = None,
    resume: bool = False,
    progress: bool = True,
) -> LoopResult:
    """Train ``model`` in place; afterwards it holds the best epoch's weights (by ``evaluate()['top1']``).

    Args:
        batches: ``(epoch, start_step) -> iterator`` over the epoch's batches from ``start_step`` on.
        loss_fn: batch -> scalar loss.
        evaluate: validation after every epoch; None keeps the last epoch.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    last, best = paths.last_checkpoint(run_dir), paths.best_checkpoint(run_dir)
    if last.exists() and not resume:
        raise PipelineError(f"{run_dir} already has checkpoints; pass --resume, or choose another --name")
    seed_all(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = Schedule(max(1, settings.epochs * settings.steps_per_epoch), settings.warmup_steps,
                         "cosine").scheduler(optimizer)
    state = {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "best_top1": -1.0,
        "best_epoch": -1,
        "best_val": None,
    }
    if resume and last.exists():
        ckpt = load_checkpoint(last)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        set_rng_state(ckpt["rng"])
        truncate_after(run_dir, state["global_step"])
    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLogger(run_dir)

    def checkpoint(path: Path) -> None:
        atomic_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "state": dict(state),
            },
            path,
        )

    total = settings.epochs * settings.steps_per_epoch
    if settings.max_steps:
        total = min(total, settings.max_steps)
    device = next(model.parameters()).device
    model.train()
    t0, seen = time.perf_counter(), 0
    while state["epoch"] < settings.epochs and state["global_step"] < total:
        epoch = state["epoch"]
        bar = tqdm(
            total=settings.steps_per_epoch,
            initial=state["step_in_epoch"],
            disable=not progress,
            desc=f"{settings.desc} {epoch + 1}/{settings.epochs}",
            unit="step",
            dynamic_ncols=True,
        )
        for batch in batches(epoch, state["step_in_epoch"]):
            if state["step_in_epoch"] >= settings.steps_per_epoch or state["global_step"] >= total:
                break
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                raise PipelineError(
                    f"{settings.desc}: loss became non-finite at step {state['global_step']}; "
                    "try a lower learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            scheduler.step()
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            seen += 1
            bar.update(1)
            if (
                state["global_step"] % settings.log_every == 0
                or state["step_in_epoch"] == settings.steps_per_epoch
            ):
                dt = time.perf_counter() - t0
                log.log(
                    "train",
                    state["global_step"],
                    {
                        "epoch": epoch,
                        "loss": float(loss.detach()),
                        "lr": scheduler.get_last_lr()[0],
                        "steps_per_s": seen / max(dt, 1e-9),
                    },
                )
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                t0, seen = time.perf_counter(), 0
        bar.close()
        if state["step_in_epoch"] < settings.steps_per_epoch:  # stopped by max_steps inside the epoch
            checkpoint(last)
            break
        val = evaluate() if evaluate is not None else None
        model.train()
        if val is not None:
            log.log("val", state["global_step"], {"epoch": epoch, **val})
        improved = val is None or val["top1"] > state["best_top1"]
        if improved:
            state.update(best_top1=val["top1"] if val else -1.0, best_epoch=epoch, best_val=val)
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        checkpoint(last)
        if improved:
            atomic_save({"model": model.state_dict(), "state": dict(state)}, best)
    log.close()
    chosen = best if best.exists() else last
    model.load_state_dict(load_checkpoint(chosen, map_location=device)["model"])
    model.eval()
    return LoopResult(
        state["best_epoch"], state["best_val"], state["global_step"], time.perf_counter() - started
    )


__all__ = [
    "LoopSettings",
    "LoopResult",
    "fit",
    "epoch_order",
    "atomic_save",
    "seed_all",
    "rng_state",
    "set_rng_state",
]
