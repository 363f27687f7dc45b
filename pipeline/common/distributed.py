"""torchrun/DDP plumbing: rank info from the environment and a gather that tolerates uneven rows."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_from_env(device: str) -> DistEnv:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    env = DistEnv(int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_RANK", 0)))
    if env.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return env


def gather_rows(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Concatenate a tensor's rows from every rank (rank order); rows may differ in count per rank."""
    if not env.enabled:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(env.world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(env.world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(device: str) -> str:
    """``auto`` -> this rank's GPU when CUDA is visible, else cpu."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def broadcast_object(obj, env: DistEnv):
    """Rank 0's value of ``obj`` on every rank (decisions only rank 0 can make, e.g. after validation)."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
