"""The run options every trainer's config shares; no torch here, so a command's --help can build its config class."""

from __future__ import annotations

from dataclasses import dataclass


TRAINING_PRECISIONS = ("auto", "fp32", "bf16")  # no fp16: the trainers use no loss scaling


@dataclass(frozen=True)
class RunOptions:
    """The part of a run config every trainer shares (its own config class adds its sections)."""

    name: str = "run"
    runs_dir: str = "runs"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU | fp32 | bf16
    log_every: int = 10
    checkpoint_every: int = 0  # extra checkpoints every N steps (0: at epoch ends only)
    max_steps: int = 0  # stop after this many steps in total (0: run all epochs)
    eval_batch_size: int = 128
    # torch's CPU threads for the run (0: torch's default, one per core). Results depend on it (a reduction split
    # over threads sums in another order), so it is part of the run's key. 1 with `experiments -j <cores>`: more
    # runs an hour on a small CPU than one run on every core.
    threads: int = 0


__all__ = ["RunOptions", "TRAINING_PRECISIONS"]
