"""Stage 2 across machines, on one: two torchrun 'nodes' of one process each (gloo), the run folder shared. Both
are killed by the loop's switch one step past the first checkpoint, restarted with --resume, and end with the
weights of an uninterrupted two-node run. The rendezvous port is a free one picked now, not a fixed one."""

from __future__ import annotations

import socket
import subprocess
import sys

import torch

from tests.test_distill import KILL_SWITCH, KILL_STEP, ROOT, distill_args, final_weights, shapes, subprocess_env

__all__ = ["shapes"]  # the module-scoped dataset + cache fixture


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(args: list[str], kill_at: int | None = None) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2 --node-rank R --nproc-per-node 1` twice, as two machines would run it."""
    port, env = _free_port(), subprocess_env()
    if kill_at is not None:
        env[KILL_SWITCH] = str(kill_at)
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                               str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
                               str(port), "-m", "stages.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), p.stdout.read()) for p in procs]


def test_two_nodes_killed_and_resumed_end_with_the_straight_runs_weights(shapes, tmp_path):
    runs = tmp_path / "runs"
    extra = ("device=cpu", "queue.size=64", "optim.epochs=2", "optim.decay_epochs=[1]")
    straight = _two_nodes(distill_args(shapes, runs, "straight", *extra))
    assert all(p.returncode == 0 for p in straight), straight[0].stdout[-3000:] + straight[1].stdout[-3000:]
    killed = _two_nodes(distill_args(shapes, runs, "nodes", *extra), kill_at=KILL_STEP)
    assert all(p.returncode != 0 for p in killed), "both nodes should stop at the kill switch"
    stopped = final_weights(runs / "nodes")["state"]["global_step"]
    assert not (runs / "nodes" / "export" / "student.pt").exists()
    resumed = _two_nodes(distill_args(shapes, runs, "nodes", *extra) + ["--resume"])
    assert all(p.returncode == 0 for p in resumed), resumed[0].stdout[-3000:] + resumed[1].stdout[-3000:]
    a, b = final_weights(runs / "straight"), final_weights(runs / "nodes")
    assert stopped < a["state"]["global_step"] and a["state"] == b["state"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"{key} differs after resume"
    assert len(b["queue"]) == 2  # one queue state per rank, both restored
    for rank in range(2):
        assert torch.equal(a["queue"][rank]["img"]["emb"], b["queue"][rank]["img"]["emb"])
    assert (runs / "nodes" / "export" / "student.pt").exists()
