"""Stage-2 step throughput: the real distillation step vs a bare student step, and cache vs online teacher.

(a) samples/s of the training step that stage 2 runs - ``pipeline.train.loop.train_step`` driving
    ``DistillObjective.step`` (cache gather, tokenisation, student forward, all four losses against a full
    ``NegativeQueue``, the dynamic balancer), backward, grad clipping, AdamW + LR schedule, enqueue, timed
    through the objective's clock hook -
    against the same student's bare step: forward, feature loss against preloaded targets, backward,
    AdamW, on preloaded pixels and tokens. Target ratio >= 0.95. The real step runs twice: on preloaded
    (already augmented) pixels, which isolates the step's own overhead, and fed by the trainer's
    DataLoader (``PairDataset`` + ``make_loader``), which adds the data path.
(b) the speed-up of cached targets over running the teacher online: the same real step with the targets
    computed inside it by the teacher (its own preprocessed pixels preloaded, so image decoding for the
    teacher is NOT counted: the online side is flattered, the speed-up is a lower bound).
(c) the channels_last speed-up: the bare step with the student's default NHWC activations against the same student
    (same weights) with channels_last off, interleaved with the others.

The machine is shared, so the bare, preloaded-real and online steps alternate one by one (all see the
same load) and each configuration's median step time is reported. The DataLoader-fed steps run as a
block in each of ``--rounds`` rounds (its worker would otherwise prefetch during the others), right after
a block of preloaded real steps that serves as its same-load control.
The queue is filled with random cache rows first, so every step sees the full ``--queue-size`` negatives
(the steady state).

Data: the stage-1 cache at artifacts/cache/openmoji/lit/train when present; otherwise random unit-norm
targets of the teacher's width written with ``pipeline.features.cache.write_shard`` for data/openmoji's train
split, or for a generated shapes dataset (tests/gen_cache.py) when openmoji is not built.
Teacher: as in bench_features.py (``lit`` if its checkpoint exists, else ``tiny-openclip``). As there,
the environment matters: with OMP_WAIT_POLICY unset, 2 torch threads on a busy 2-core machine made every
step about 5x slower than 1 thread here (OpenMP spin-waiting); PASSIVE removed that. The benchmark applies the
CPU settings every ``clipdistill`` command applies (``pipeline.common.runtime.tune_cpu_runtime``: OMP_WAIT_POLICY
PASSIVE unless set, glibc keeping freed buffers), so it measures the step stage 2 runs.

    .venv/bin/python bench/bench_distill.py [--student small|tiny] [--batch-size 64] [--steps 5]
                                            [--queue-size 8192] [--teacher SPEC] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from pipeline.common.runtime import tune_cpu_runtime  # noqa: E402

tune_cpu_runtime()  # the CPU settings every clipdistill command runs with, before torch loads: measure what stage 2 runs

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.bench_features import build_teacher, environment, table  # noqa: E402
from pipeline.common import config as cfgio  # noqa: E402
from pipeline.common.distributed import DistEnv  # noqa: E402
from pipeline.common.precision import autocast  # noqa: E402
from pipeline.data.images import load_rgb  # noqa: E402
from pipeline.data.manifest import Manifest  # noqa: E402
from pipeline.distill.data import Batch  # noqa: E402
from pipeline.distill.losses import FeatureDistillLoss  # noqa: E402
from pipeline.distill.queue import QueueBatch  # noqa: E402
from pipeline.distill.trainer import (  # noqa: E402
    DataSection, DistillConfig, DistillObjective, OptimSection, QueueSection,
)
from pipeline.features.cache import CacheMeta, FeatureCache, shard_name, write_shard  # noqa: E402
from pipeline.teachers.base import Teacher  # noqa: E402
from pipeline.train.loop import LoopSettings, make_optimizer, train_step  # noqa: E402

REAL_CACHE = Path("artifacts/cache/openmoji/lit/train")
OPENMOJI_TRAIN = Path("data/openmoji/train.parquet")


# ---------------------------------------------------------------------------------------------- data
def random_cache(manifest: Manifest, out: Path, width: int) -> FeatureCache:
    """Random unit-norm fp16 targets for every image and caption of ``manifest``, as one cache shard."""
    rng = np.random.default_rng(0)
    image_ids = manifest.unique_images()[0]
    sample_ids = manifest.column("sample_id").astype(np.int64)
    unit = lambda n: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(  # noqa: E731
        rng.standard_normal((n, width), dtype=np.float32))
    meta = CacheMeta("bench-random", "bench", width, "float16", manifest.content_hash, "bench", "train",
                     len(image_ids), 1)
    write_shard(out / shard_name(0, 1), meta, unit(len(image_ids)).astype(np.float16), image_ids,
                unit(len(sample_ids)).astype(np.float16), sample_ids,
                manifest.column("image_id").astype(np.int64))
    return FeatureCache(out)


@dataclass
class BenchData:
    """Where the benchmark's train split lives, laid out as the trainer reads it (manifest dir + cache dir)."""

    source: str
    manifest_dir: Path
    cache_dir: Path
    split: str = "train"


def _as_split(manifest: Manifest, tmp: Path, split: str) -> Path:
    """A copy of ``manifest`` as ``<tmp>/manifests/<split>.parquet`` (its image root is absolute)."""
    manifest.write(tmp / "manifests" / f"{split}.parquet")
    return tmp / "manifests"


def load_data(args, width: int, tmp: Path) -> BenchData:
    if args.cache:
        split_dir = Path(args.cache)
        manifest = Manifest.read(args.manifest or OPENMOJI_TRAIN)
        return BenchData(f"cache {args.cache}", _as_split(manifest, tmp, split_dir.name), split_dir.parent,
                         split_dir.name)
    # summary.json is written once the last shard is: a cache still being built is not used
    generate = args.manifest == "generate"  # --smoke: never the real cache or openmoji
    if (REAL_CACHE / "summary.json").exists() and OPENMOJI_TRAIN.exists() and not args.manifest:
        return BenchData(f"stage-1 cache {REAL_CACHE}", OPENMOJI_TRAIN.parent, REAL_CACHE.parent)
    if not generate and (args.manifest or OPENMOJI_TRAIN.exists()):
        path = Path(args.manifest or OPENMOJI_TRAIN)
        manifest = Manifest.read(path)
        random_cache(manifest, tmp / "cache" / "train", width)
        return BenchData(f"{path} + random targets", _as_split(manifest, tmp, "train"), tmp / "cache")
    from tests.gen_cache import make_dataset

    needed = (args.warmup + args.steps + 2) * args.batch_size  # one round's rows within one epoch
    # about 1.2 train rows per image (60% of images in train, 1-3 captions each)
    manifest_dir = make_dataset(tmp / "shapes", n_images=max(40 if generate else 200, math.ceil(needed / 1.1)))
    random_cache(Manifest.read(manifest_dir / "train.parquet"), tmp / "cache" / "train", width)
    return BenchData("generated shapes + random targets", manifest_dir, tmp / "cache")


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Clock:
    """Per-step phase seconds of one configuration (CUDA is synchronised so kernels count in their phase)."""

    device: torch.device
    steps: list[dict[str, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self):
        self.steps.append({})
        with self("step"):
            yield

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.steps[-1][name] = self.steps[-1].get(name, 0.0) + time.perf_counter() - t0

    def per_step(self, name: str = "step", stat=np.median) -> float:
        return float(stat([s.get(name, 0.0) for s in self.steps]))


# ---------------------------------------------------------------------------------------------- bench
class DistillBench:
    """Stage 2's own objective (``DistillObjective``) and step (``pipeline.train.loop.train_step``), timed through
    the objective's clock hook, next to a bare baseline step of the same student."""

    def __init__(self, args, data: BenchData, teacher: Teacher, tmp: Path):
        self.args, self.teacher = args, teacher
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        cfg = cfgio.load(DistillConfig, None, [
            f"data.manifest_dir={data.manifest_dir}", f"data.cache_dir={data.cache_dir}",
            f"data.train_split={data.split}", "data.val_split=none", f"data.workers={args.workers}",
            f"student={args.student}", f"optim.batch_size={args.batch_size}", f"queue.size={args.queue_size}",
            "seed=0", f"device={args.device}"])
        self.objective = o = DistillObjective(cfg, tmp, self.device, DistEnv())
        self.rows, self.cache, self.model = o.rows, o.cache, o.model.train()
        self.dataset, self.sampler, self.loader, self.queue = o.dataset, o.sampler, o.loader, o.queue
        self.optim = OptimSection()
        settings = LoopSettings(self.optim.epochs, o.steps_per_epoch, self.optim.lr, self.optim.weight_decay,
                                decay="constant", grad_clip=self.optim.grad_clip)
        self.optimizer, self.scheduler, self.params = make_optimizer(o, settings)
        self.fd = FeatureDistillLoss()
        self._fill_queue()
        self._step = 0
        # (c) the same student with NCHW activations (channels_last off), same weights, its own optimizer
        from pipeline.students.model import build_student

        nchw_config = dataclasses.replace(self.model.config, channels_last=False)
        self.nchw_model = build_student(nchw_config, tokenizer=self.model.tokenizer, load_weights=False,
                                        device=self.device).train()
        self.nchw_model.load_state_dict(self.model.state_dict())
        self.nchw_optimizer = torch.optim.AdamW(self.nchw_model.parameters(), lr=self.optim.lr)

    def _fill_queue(self) -> None:
        """Random cache rows in every slot (trainer's random mode), so CD sees K negatives from step 1."""
        rows, cache = self.rows, self.cache

        def sample(n: int) -> QueueBatch:
            pick = np.random.default_rng(n).integers(0, len(rows), n)
            return QueueBatch(img=cache.image.gather(rows.image_rows[pick]), img_ids=rows.image_ids[pick],
                              txt=cache.text.gather(rows.text_rows[pick]), txt_ids=rows.image_ids[pick],
                              txt_hash=rows.caption_hash[pick])
        self.queue.refill_random(sample)

    # -- batches -------------------------------------------------------------------------------
    def loader_batches(self) -> Iterator[Batch]:
        """The trainer's loader, epoch after epoch (its workers persist across epochs, as in training)."""
        epoch = 0
        while True:
            self.sampler.set_epoch(epoch)
            yield from self.loader
            epoch += 1

    def preload(self, n: int, with_teacher: bool) -> list[dict]:
        """n augmented batches from the real loader, with the baseline's tokens/targets and teacher pixels."""
        out, it = [], self.loader_batches()
        tf = self.teacher.image_transform()
        for _ in range(n):
            batch = next(it)
            idx = batch.rows.numpy()
            t_img, t_txt = self.objective.targets(idx, batch)
            item = {"batch": batch, "pixels": batch.pixels.to(self.device),
                    # what an NCHW student's loader gives it (the loader lays a batch out as its student runs)
                    "pixels_nchw": batch.pixels.to(self.device).contiguous(),
                    "tokens": {k: v.to(self.device) for k, v in self.model.tokenizer(batch.captions).items()},
                    "t_img": t_img, "t_txt": t_txt}
            if with_teacher:  # the teacher's own preprocessing of the same images, decoded here, untimed
                item["teacher_pixels"] = torch.stack([tf(load_rgb(self.rows.locations[i])) for i in idx])
            out.append(item)
        it.close()
        if with_teacher:  # the teacher's warm-up, on a few rows rather than a whole (slow) online step
            self.teacher.encode_images(out[0]["teacher_pixels"][:4])
            self.teacher.encode_texts(self.teacher.tokenize(out[0]["batch"].captions[:4]))
        return out

    # -- steps ---------------------------------------------------------------------------------
    def real_step(self, batch: Batch, targets: Callable | None, clock: Clock, pixels: torch.Tensor | None = None):
        """One step exactly as training runs it (``train_step`` + ``DistillObjective.step``); ``targets``
        replaces the cache gather (the online teacher), ``pixels`` the batch's pixels (already on the device)."""
        o = self.objective
        o.clock = clock
        if targets is not None:
            o.targets = targets
        if pixels is not None:
            batch = dataclasses.replace(batch, pixels=pixels)
        try:
            train_step(o, self.optimizer, self.scheduler, self.params, self.optim.grad_clip, batch, self._step,
                       clock)
        finally:
            o.__dict__.pop("targets", None)
        self._step += 1

    def bare_step(self, item: dict, clock: Clock, nchw: bool = False) -> None:
        model, optimizer = (self.nchw_model, self.nchw_optimizer) if nchw else (self.model, self.optimizer)
        with clock("forward"), self.autocast():
            s_img, s_txt = model(item["pixels_nchw" if nchw else "pixels"], item["tokens"])
        with clock("losses"):
            loss = self.fd(s_img, s_txt, item["t_img"], item["t_txt"])["fd"]
        with clock("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with clock("clip + optimizer"):
            optimizer.step()

    def autocast(self):
        """The trainer's precision (auto: bf16 autocast on CUDA, full precision on CPU)."""
        return autocast(self.device, self.objective.cfg.precision)

    # -- configurations ------------------------------------------------------------------------
    def one_step(self, kind: str, item: dict, clock: Clock) -> None:
        with clock.step():
            if kind in ("bare", "bare NCHW"):
                self.bare_step(item, clock, nchw=kind == "bare NCHW")
            elif kind == "preloaded":
                self.real_step(item["batch"], None, clock, item["pixels"])
            else:  # online: the teacher encodes the batch inside the step
                t, pix = self.teacher, item["teacher_pixels"]

                def online(idx, batch):
                    return t.encode_images(pix), t.encode_texts(t.tokenize(batch.captions))

                self.real_step(item["batch"], online, clock, item["pixels"])

    def interleaved(self, items: list[dict], warmup: int, steps: int, online_steps: int,
                    clocks: dict[str, Clock]) -> None:
        """bare, preloaded-real and (first ``online_steps`` timed) online steps alternating one by one, so the
        configurations see the same machine load; warm-up steps are not recorded."""
        for s in range(warmup + steps):
            item = items[s % len(items)]
            kinds = ["bare", "bare NCHW", "preloaded"] + (["online"] if warmup <= s < warmup + online_steps else [])
            for kind in kinds:
                self.one_step(kind, item, clocks[kind] if s >= warmup else Clock(self.device))

    def preloaded_block(self, items: list[dict], steps: int, clock: Clock) -> None:
        """Real steps on preloaded pixels, run right before a loader block as its same-load control."""
        for s in range(steps):
            self.one_step("preloaded", items[s % len(items)], clock)

    def loader_block(self, warmup: int, steps: int, clock: Clock) -> None:
        """Real steps fed by a fresh trainer DataLoader (worker start-up falls in the warm-up)."""
        source = self.loader_batches()
        for s in range(warmup + steps):
            c = clock if s >= warmup else Clock(self.device)
            with c.step():
                with c("data wait"):
                    batch = next(source)
                self.real_step(batch, None, c)
        source.close()  # shuts the workers down before anything else runs

    def loader_alone(self, batches: int) -> float:
        """samples/s of the DataLoader with nothing else running (its standalone capacity)."""
        it = self.loader_batches()
        next(it)  # worker start-up
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - t0
        it.close()
        return batches * self.args.batch_size / seconds


def phase_table(clocks: dict[str, Clock]) -> str:
    names = []
    for c in clocks.values():
        for step in c.steps:
            names += [n for n in step if n not in names and n != "step"]
    rows = [[n, *[f"{1e3 * c.per_step(n):.1f}" for c in clocks.values()]] for n in names]
    rows.append(["step (median)", *[f"{1e3 * c.per_step():.1f}" for c in clocks.values()]])
    return table(rows, ["phase (median ms/step)", *clocks])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="small", help="student preset (tiny for a quick run)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first in each round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (interleaved steps, DataLoader block)")
    ap.add_argument("--queue-size", type=int, default=QueueSection.size)
    ap.add_argument("--workers", type=int, default=DataSection.workers, help="DataLoader workers (trainer's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads, every side")
    ap.add_argument("--teacher", default=None, help="online teacher for (b); see bench_features.py --help")
    ap.add_argument("--online-steps", type=int, default=None, help="timed online steps of (b) per round "
                    "(default: --steps // 2, at least 1)")
    ap.add_argument("--cache", default=None, help="a stage-1 cache split directory (with --manifest)")
    ap.add_argument("--manifest", default=None, help="train manifest (default: data/openmoji/train.parquet)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on generated data (the tests run it)")
    args = ap.parse_args()
    if args.smoke:
        args.student, args.batch_size, args.steps, args.warmup, args.rounds = "tiny", 8, 1, 1, 1
        args.queue_size, args.workers, args.teacher, args.manifest = 64, 0, "tiny-openclip", "generate"
    torch.set_num_threads(args.threads)
    online_steps = min(args.steps, args.online_steps or max(1, args.steps // 2))

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        spec, teacher = build_teacher(args.teacher)
        teacher.to(args.device)
        data = load_data(args, teacher.width, tmp)
        t0 = time.perf_counter()
        bench = DistillBench(args, data, teacher, tmp / "run")
        source, cache, rows = data.source, bench.cache, bench.rows
        if cache.width != teacher.width:
            raise SystemExit(f"cache width {cache.width} != teacher width {teacher.width}: "
                             "pick a matching --teacher")
        print(f"student {args.student}, batch {args.batch_size}, queue {args.queue_size} x {cache.width}, "
              f"{args.workers} loader workers, {args.threads} torch threads, device {args.device}; "
              f"data: {source} ({len(rows)} rows); online teacher {spec} ({teacher.name}); "
              f"set-up {time.perf_counter() - t0:.1f}s; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus; {environment()}")
        items = bench.preload(min(args.warmup + max(args.steps, online_steps), 8), with_teacher=True)

        clocks = {k: Clock(bench.device) for k in ("bare", "bare NCHW", "preloaded", "loader", "online")}
        data_ratios = []  # per round: loader block vs the preloaded block run just before it
        for r in range(args.rounds):
            bench.interleaved(items, args.warmup, args.steps, online_steps, clocks)
            control, loader = Clock(bench.device), Clock(bench.device)
            bench.preloaded_block(items, args.steps, control)
            bench.loader_block(args.warmup, args.steps, loader)
            clocks["loader"].steps += loader.steps
            data_ratios.append(control.per_step() / loader.per_step())
            print(f"  round {r + 1}: data path x{data_ratios[-1]:.3f} on the adjacent preloaded block; "
                  f"load average {os.getloadavg()[0]:.1f}")
        alone = bench.loader_alone(max(3, args.steps // 2))

    b = args.batch_size
    sps = {k: b / c.per_step() for k, c in clocks.items()}
    labels = {"bare": "bare fwd/bwd + AdamW, preloaded (baseline)",
              "bare NCHW": "the same, channels_last off (c)",
              "preloaded": "real step, preloaded pixels",
              "loader": "real step, trainer DataLoader",
              "online": "real step, teacher online (b)"}
    print(f"\n(a) samples/s = batch / median step time over {args.rounds} rounds x {args.steps} timed steps "
          f"(online: {online_steps}); mean shown too")
    print(table([[labels[k], f"{sps[k]:.1f}", f"{1e3 * c.per_step():.0f}",
                  f"{1e3 * c.per_step(stat=np.mean):.0f}", f"{sps[k] / sps['bare']:.3f}"]
                 for k, c in clocks.items()],
                ["configuration", "samples/s", "median ms/step", "mean ms/step", "vs baseline"]))
    step_ratio, data_ratio = sps["preloaded"] / sps["bare"], float(np.median(data_ratios))
    print(f"step overhead (cache gather + tokenise + 4 losses + queue + balancer + clip + schedule): ratio "
          f"{step_ratio:.3f}; target >= 0.95: {'met' if step_ratio >= 0.95 else 'NOT met'}")
    print(f"data path (DataLoader workers vs preloaded pixels, adjacent blocks, median of rounds): "
          f"x{data_ratio:.3f}; with it, the real step vs baseline: {step_ratio * data_ratio:.3f}. "
          f"The DataLoader alone delivers {alone:.1f} samples/s.")
    print("  (the loader row above is from separate blocks, so machine load drifts into its 'vs baseline')")
    print("\nwhere a step's time goes:")
    print(phase_table(clocks))
    print(f"\n(c) channels_last (NHWC activations, the students' default) vs NCHW, bare step, interleaved: "
          f"{1e3 * clocks['bare'].per_step():.0f} vs {1e3 * clocks['bare NCHW'].per_step():.0f} ms/step -> "
          f"speed-up {sps['bare'] / sps['bare NCHW']:.2f}x")
    speedup = sps["preloaded"] / sps["online"]
    print(f"\n(b) cached targets vs teacher {spec} online: {1e3 * clocks['preloaded'].per_step():.0f} vs "
          f"{1e3 * clocks['online'].per_step():.0f} ms/step -> speed-up {speedup:.2f}x "
          "(teacher decoding excluded, so a lower bound)")


if __name__ == "__main__":
    main()
