"""The one learning-rate schedule every trainer uses: a linear warm-up times a decay.

decay "step": the paper's schedule (method.md 1.6), x ``factor`` at each epoch in ``decay_epochs``;
decay "cosine": half a cosine from 1 to 0 between the end of warm-up and ``total_steps``;
decay "constant": 1 after warm-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.common.errors import PipelineError

DECAYS = ("step", "cosine", "constant")


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    warmup_steps: int = 0
    decay: str = "cosine"
    steps_per_epoch: int = 1  # step decay only
    decay_epochs: tuple = ()
    decay_factor: float = 0.1

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise PipelineError(f"learning-rate decay must be one of {DECAYS}, not {self.decay!r}")

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
        if self.decay == "step":
            epoch = step // max(1, self.steps_per_epoch)
            f = self.decay_factor ** sum(1 for e in self.decay_epochs if epoch >= e)
        elif self.decay == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, max(0, step - self.warmup_steps) / span)
            f = 0.5 * (1.0 + math.cos(math.pi * t))
        else:
            f = 1.0
        if self.warmup_steps:
            f *= min(1.0, (step + 1) / self.warmup_steps)
        return f

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)
