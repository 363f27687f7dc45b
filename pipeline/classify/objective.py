"""The classification trainers (head, probe, every student generation) on the one training loop.

Each of them is "a batch function and a loss function" (``FunctionObjective``); ``fit`` runs it with
``pipeline.train.loop`` (run folder, checkpoints, exact resume, best epoch by validation top-1) and leaves the
best epoch's weights in the model. The batch order is a function of (seed, epoch) and a resumed epoch skips
the batches already done, so a resumed run continues exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from pipeline.common import paths
from pipeline.common.errors import PipelineError
from pipeline.train.loop import LoopResult, LoopSettings, Objective, StepOutput, best_checkpoint
from pipeline.train.loop import fit as fit_objective
from pipeline.train.state import seed_all


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class FunctionObjective(Objective):
    """An objective made of ``batches(epoch, start)``, ``loss_fn(batch)`` and an optional ``evaluate()``."""

    def __init__(self, model: torch.nn.Module, batches: Callable[[int, int], Iterator[Any]],
                 loss_fn: Callable[[Any], torch.Tensor], evaluate: Optional[Callable[[], dict]] = None):
        self.model, self.batches, self.loss_fn, self.evaluate = model, batches, loss_fn, evaluate

    def epoch_batches(self, epoch: int, start: int):
        return self.batches(epoch, start)

    def step(self, batch, step: int) -> StepOutput:
        return StepOutput(self.loss_fn(batch), items=1)

    def validate(self):
        return self.evaluate() if self.evaluate is not None else None


def fit(run_dir: Path, model: torch.nn.Module, settings: LoopSettings, seed: int,
        batches: Callable[[int, int], Iterator[Any]], loss_fn: Callable[[Any], torch.Tensor],
        evaluate: Optional[Callable[[], dict]] = None, resume: bool = False, progress: bool = True) -> LoopResult:
    """Train ``model`` in place; afterwards it holds the best epoch's weights (by ``evaluate()['top1']``)."""
    run_dir = Path(run_dir)
    if paths.last_checkpoint(run_dir).exists() and not resume:
        raise PipelineError(f"{run_dir} already has checkpoints; pass --resume, or choose another --name")
    resume = resume and paths.last_checkpoint(run_dir).exists()  # --resume starts a never-started step fresh
    seed_all(seed)
    device = next(model.parameters()).device
    result = fit_objective(run_dir, FunctionObjective(model, batches, loss_fn, evaluate), settings,
                           resume=resume, progress=progress)
    model.load_state_dict({k: v.to(device) for k, v in best_checkpoint(run_dir)["model"].items()})
    model.eval()
    return result


__all__ = ["FunctionObjective", "LoopSettings", "LoopResult", "fit", "epoch_order"]
