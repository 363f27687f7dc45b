"""Pieces every trainer shares for exact resume: RNG state capture/restore, seeding, atomic checkpoint
writes and the precision setting (bf16 autocast on CUDA by default)."""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import random
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline.common import config as cfgio
from pipeline.common.errors import PipelineError, first_line
from pipeline.common import io
from pipeline.common import paths


def rng_state() -> dict:
    """Every RNG a training step draws from (Python, numpy, torch CPU and CUDA), as tensors and plain types
    so a checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_save(obj, path: Path) -> Path:
    """torch.save to a temporary name, then rename: a kill never leaves a half-written checkpoint."""
    with io.atomic_path(path, checksum=True) as tmp:
        torch.save(obj, tmp)
    return path


def load_checkpoint(path: Path, what: str = "checkpoint", map_location="cpu", mmap: bool = False,
                    verify: bool = True) -> dict:
    """Read a file this project wrote with torch.save after checking its ``.blake2b`` checksum: tensors and plain
    types only (``weights_only=True``), so a file carrying a pickled object (which could run code) is refused with
    a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} not found: {path}")
    # The checksum rule (io.verify_file): damaged or unchecked files are refused. ``verify=False`` only for a peek
    # at small metadata that a full, checked load follows.
    if verify:
        io.verify_file(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if str(exc) else ""
        raise PipelineError(f"refusing {what} {path}: it holds more than tensors and plain values ({detail})") \
            from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:  # truncated or foreign files
        raise PipelineError(f"cannot read {what} {path}: {first_line(exc)}") from None


_CLAIMED: set[Path] = set()  # run folders this process is training (claims are re-entrant)


@contextlib.contextmanager
def claim_run_dir(run_dir: str | Path) -> Iterator[None]:
    """Hold ``<run_dir>/training.lock`` while the block runs: a second process on the same run (another sweep
    runner, a second terminal) would interleave its checkpoints with the first's, so it stops with an error
    instead. A lock left by a killed process is taken over. torchrun ranks other than 0 do not claim."""
    run_dir = Path(run_dir).resolve()
    if int(os.environ.get("RANK", "0")) != 0 or run_dir in _CLAIMED:
        yield
        return
    with io.exclusive(run_dir / "training") as mine:
        if not mine:
            holder = io.lock_holder(run_dir / "training")  # "?" when released this instant
            raise PipelineError(f"run {run_dir} is being trained by another process (pid {holder}); wait for it to "
                                f"finish or stop it, then resume (no such training? delete {run_dir}/training.lock)")
        _CLAIMED.add(run_dir)
        try:
            yield
        finally:
            _CLAIMED.discard(run_dir)


def one_process_per_run(train: Callable) -> Callable:
    """Decorate a trainer ``train(cfg, ...)`` (cfg with ``runs_dir`` and ``name``) with :func:`claim_run_dir`;
    the run's ``threads`` setting (RunOptions) takes effect first."""

    @functools.wraps(train)
    def claimed(cfg, *args, **kwargs):
        use_threads(getattr(cfg, "threads", 0))
        with claim_run_dir(Path(cfg.runs_dir) / cfg.name):
            return train(cfg, *args, **kwargs)

    return claimed


def use_threads(threads: int) -> None:
    """torch's CPU threads for this process; 0 keeps torch's default."""
    if threads < 0:
        raise PipelineError(f"threads must be 0 (torch's default) or more, not {threads}")
    if threads:
        torch.set_num_threads(threads)


def prepare_run_dir(cfg, resume: bool) -> Path:
    """``runs_dir/name`` for a run config (any dataclass with ``runs_dir`` and ``name``): a resume needs a
    checkpoint and the same config; a fresh start refuses a folder that already has checkpoints."""
    run_dir = Path(cfg.runs_dir) / cfg.name
    last = paths.last_checkpoint(run_dir)
    if resume:
        if not last.exists():
            raise PipelineError(f"--resume: no checkpoint at {last}")
        saved = cfgio.load(type(cfg), run_dir / "config.json")
        if cfgio.to_dict(saved) != cfgio.to_dict(cfg):
            a, b = cfgio.flatten(cfgio.to_dict(saved)), cfgio.flatten(cfgio.to_dict(cfg))
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise PipelineError(f"--resume with a different config than {run_dir}/config.json: {diff}")
    elif last.exists():
        raise PipelineError(f"run {run_dir} already has checkpoints; pass --resume, or choose another --name")
    return run_dir
