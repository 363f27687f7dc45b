"""Classification students (method.md 4, step 2): what memory layout and precision cost per training step.

A student generation's step is the real one: ``ImageClassifier`` (the teacher's architecture, e.g.
EfficientNet-Lite2) + ``student_training.student_loss`` (soft cross-entropy against cached targets) through
``pipeline.train.loop.train_step`` (AdamW, clipping, schedule). Configurations:
    NCHW fp32           contiguous tensors, full precision (the baseline)
    channels_last fp32  NHWC activations (``distill.channels_last``, the default)
    channels_last bf16  NHWC under bf16 autocast (``distill.precision: bf16``; ``auto`` picks it on CUDA only)
They alternate step by step over ``--rounds`` rounds so that each sees the same machine load; the median step
time of each is reported, and each one's ratio to the baseline (> 1: faster). On a CPU, depthwise convolutions
dominate an EfficientNet's step; on CUDA run it with ``--device cuda``.

    .venv/bin/python bench/bench_classify_student.py [--arch tf_efficientnet_lite2] [--image-size 112]
                                                     [--batch-size 64] [--classes 100] [--rounds 5]
                                                     [--device cpu] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from bench.bench_features import environment, table  # noqa: E402
from pipeline.classify.objective import FunctionObjective  # noqa: E402
from pipeline.classify.student_training import student_loss  # noqa: E402
from pipeline.classify.student import ImageClassifier  # noqa: E402
from pipeline.train.loop import LoopSettings, make_optimizer, train_step  # noqa: E402

CONFIGS = (("NCHW fp32", False, "fp32"), ("channels_last fp32", True, "fp32"), ("channels_last bf16", True, "bf16"))


def make_step(arch: str, size: int, batch: int, classes: int, channels_last: bool, precision: str, device: str):
    """A closure running one real training step of a fresh student on a fixed random batch."""
    torch.manual_seed(0)
    model = ImageClassifier({"kind": "timm", "name": arch, "kwargs": {}}, size, classes,
                            channels_last=channels_last).to(device)
    pixels = torch.randn(batch, 3, size, size)
    soft = torch.softmax(torch.randn(batch, classes), -1)
    objective = FunctionObjective(model, lambda e, s: iter(()),
                                  lambda b: student_loss(model, pixels, soft, 1.0, precision))
    optimizer, scheduler, params = make_optimizer(
        objective, LoopSettings(epochs=1, steps_per_epoch=10**6, lr=1e-3, weight_decay=0.05))
    model.train()

    def step(i: int) -> float:
        start = time.perf_counter()
        train_step(objective, optimizer, scheduler, params, 5.0, None, i)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tf_efficientnet_lite2", help="timm name of the student's encoder")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per configuration (after one warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs")
    a = ap.parse_args()
    if a.smoke:
        a.arch, a.image_size, a.batch_size, a.classes, a.rounds = "tf_efficientnet_lite0", 32, 4, 5, 1
    steps = {name: make_step(a.arch, a.image_size, a.batch_size, a.classes, cl, prec, a.device)
             for name, cl, prec in CONFIGS}
    for step in steps.values():
        step(0)  # warm-up: allocator, oneDNN primitive caches
    times = {name: [] for name in steps}
    for r in range(a.rounds):
        for name, step in steps.items():
            times[name].append(step(r + 1))
    base = statistics.median(times[CONFIGS[0][0]])
    rows = [[name, f"{statistics.median(t) * 1000:.0f}", f"{base / statistics.median(t):.2f}"]
            for name, t in times.items()]
    print(f"{a.arch} at {a.image_size} px, batch {a.batch_size}, {a.classes} classes, {a.device}, "
          f"{torch.get_num_threads()} threads, {a.rounds} rounds; {environment()}")
    print(table(rows, ["configuration", "median step (ms)", "speed vs NCHW fp32"]))
    cl, bf = (statistics.median(times[name]) for name in (CONFIGS[1][0], CONFIGS[2][0]))
    print(f"speed vs NCHW fp32 (its median step time / this one's): channels_last {base / cl:.2f}x, "
          f"channels_last + bf16 {base / bf:.2f}x")


if __name__ == "__main__":
    main()
