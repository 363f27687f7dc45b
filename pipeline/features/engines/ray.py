"""Stage 1 on a Ray cluster: the job's shard plan (``features.job.plan_shards``), each shard one task for a pool
of actors that each load the teacher once (from a spec string, or a picklable factory in tests) and run the same
mapper and writer as the local path (lock, atomic publish, checksums, rejects, views) on the shared cache folder.

Only the driver talks to Ray; the actors write files. A shard whose actor died (process killed, machine lost) goes
back to the queue, at most ``max_retries`` times. The dead worker's shard lock is taken over once its holder is
known dead (its pid gone on its host; from another host, its lease run out): until then a retry finds the shard
"busy" and is tried again every ``RETRY_BUSY_S`` for up to a lease, rather than left undone. A shard that fails
for any other reason stops the job with one line (unreadable images are not failures: they are rejects, as on
the local path). Actors that fit once a machine joins the cluster take the next shard. ``ray`` is imported
lazily: it is the optional ``cluster`` extra.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

from tqdm import tqdm

from pipeline.common import io
from pipeline.common.errors import PipelineError, first_line
from pipeline.features.job import FeatureJob, FeatureSummary, cache_meta, finish_job, plan_shards
from pipeline.features.reader import SplitReader
from pipeline.features.shard import ShardInput
from pipeline.features.shard_writer import ShardWriter
from pipeline.teachers.base import Teacher

TeacherSource = Union[str, Callable[[], Teacher]]  # a spec (load_teacher) or a picklable factory
MISSING = ("the Ray engine needs the 'cluster' extra: pip install '.[cluster]' -c constraints.txt "
           "(make install installs it)")


def import_ray():
    try:
        import ray
    except ImportError:
        raise PipelineError(MISSING) from None
    return ray


RETRY_BUSY_S = 0.5  # how often a dead worker's shard is tried again while its lock still looks held


@dataclass
class RayOptions:
    address: str | None = None  # None: start a local cluster (unless this process already joined one); "auto"
    workers: int | None = None  # actors; None: as many as the cluster's CPUs (or GPUs) hold, growing with it
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_retries: int = 3  # per shard, after its actor died
    device: str = "auto"  # in each actor: auto = its GPU when it was given one, else cpu


@dataclass(frozen=True)
class TeacherIdentity:
    """What the driver needs of the teacher (cache metadata), reported by an actor: the driver loads no model."""

    fp: str
    name: str
    width: int
    device: str
    decode_on_device: bool

    def fingerprint(self) -> str:
        return self.fp


@dataclass
class _JobContext:
    key: int
    job: FeatureJob  # its manifest travels once per actor per job (the mapper asks the teacher what it knows)
    meta: object


class ShardWorker:
    """One actor: holds the teacher; maps and writes the shards it is given (the local path's parts)."""

    def __init__(self, source: TeacherSource, device: str, decode: str, views: bool):
        from pipeline.common.distributed import resolve_device
        from pipeline.features.device_input import choose_decode

        dev = resolve_device(device)
        if isinstance(source, str):
            from pipeline.teachers import load_teacher

            self.teacher = load_teacher(source, device=dev)
        else:
            self.teacher = source().to(dev)
        if views:
            from pipeline.features.views import teacher_view_transform

            teacher_view_transform(self.teacher)  # a teacher without a stated preprocessing fails here
        on_device = choose_decode(decode, self.teacher.device, self.teacher.tensor_preprocess())
        t = self.teacher
        self.identity = TeacherIdentity(t.fingerprint(), t.name, int(t.width), str(t.device), bool(on_device))
        self.context: tuple = (None, None)  # (job key, (mapper, writer) or the exception preparing it raised)

    def describe(self) -> tuple[TeacherIdentity, str, int]:
        return self.identity, socket.gethostname(), os.getpid()

    def prepare(self, ctx: _JobContext) -> None:
        from pipeline.features.mapper import FeatureMapper

        job = ctx.job
        try:
            mapper = FeatureMapper(self.teacher, batch_size=job.batch_size, text_batch_size=job.text_batch_size,
                                   num_workers=job.num_workers, dtype=job.dtype, decode=job.decode,
                                   views=job.views, known=self.teacher.known_embeddings(job.manifest))
            self.context = (ctx.key, (mapper, ShardWriter(job.out_dir, ctx.meta)))  # one job at a time
        except Exception as exc:  # nobody waits on prepare: the job's first shard reports it
            self.context = (ctx.key, exc)
            raise

    def run_shard(self, key: int, inp: ShardInput) -> dict:
        prepared_for, prepared = self.context
        if prepared_for != key:
            raise PipelineError(f"this worker was not prepared for job {key} (it holds job {prepared_for})")
        if isinstance(prepared, Exception):
            raise prepared
        mapper, writer = prepared
        path = writer.path(inp.index)
        result = {"name": path.name, "index": inp.index, "images": 0, "texts": 0, "rejects": 0,
                  "read": 0.0, "model": 0.0, "write": 0.0, "worker": f"{socket.gethostname()}:{os.getpid()}"}
        with io.exclusive(path) as mine:  # the same per-shard lock as the local path (and other jobs)
            if not mine or path.exists():
                return {**result, "status": "busy" if not mine else "skipped"}
            read, model = mapper.clock.read, mapper.clock.model
            out = mapper(inp)
            t = time.perf_counter()
            writer(out)
            return {**result, "status": "written", "images": len(out.image_id), "texts": out.texts,
                    "rejects": len(out.rejects), "read": mapper.clock.read - read,
                    "model": mapper.clock.model - model, "write": time.perf_counter() - t}


@dataclass
class _Actor:
    handle: object
    ready: object  # the ObjectRef of describe(): resolved once the actor has loaded the teacher
    started: bool = False
    prepared: int = -1  # the job key it has a mapper for
    shard: int | None = None


@dataclass
class RayEngine:
    """An actor pool kept across splits (each actor loads the teacher once); ``run(job)`` is one split."""

    source: TeacherSource
    options: RayOptions = field(default_factory=RayOptions)
    decode: str = "auto"
    views: bool = False
    echo: Callable[[str], None] = print

    def __post_init__(self):
        self.ray = import_ray()
        if not self.ray.is_initialized():
            try:
                if self.options.address:
                    self.ray.init(address=self.options.address, log_to_driver=False)
                else:
                    self.ray.init(include_dashboard=False, log_to_driver=False)
            except Exception as exc:  # Ray's own errors (no cluster there, version mismatch, ...): one line
                where = f"the Ray cluster at {self.options.address}" if self.options.address else "a local Ray"
                raise PipelineError(f"cannot start or reach {where}: {first_line(exc)}") from None
        self.remote = self.ray.remote(ShardWorker)
        self.actors: list[_Actor] = []
        self.replaced = 0
        self.written_by: dict[str, int] = {}  # host:pid -> shards it wrote (which workers took part)
        self.identity: TeacherIdentity | None = None
        self._jobs = 0
        try:
            self._grow()
            self.identity = self._first_identity()
        except BaseException:
            self.shutdown()  # the actors that did start would otherwise outlive the failed engine
            raise

    # ---- the pool ----
    def _target(self) -> int:
        if self.options.workers:
            return self.options.workers
        res = self.ray.cluster_resources()
        if self.options.gpus_per_worker > 0:
            return max(1, int(res.get("GPU", 0) // self.options.gpus_per_worker))
        return max(1, int(res.get("CPU", 1) // self.options.cpus_per_worker))

    def _grow(self) -> None:
        """Start actors up to the target; those that do not fit yet start when a machine joins."""
        while len(self.actors) < self._target():
            self._start_actor()

    def _start_actor(self) -> None:
        o = self.options
        handle = self.remote.options(num_cpus=o.cpus_per_worker, num_gpus=o.gpus_per_worker,
                                     max_restarts=0).remote(self.source, o.device, self.decode, self.views)
        self.actors.append(_Actor(handle, handle.describe.remote()))

    def _first_identity(self) -> TeacherIdentity:
        """The teacher as the first worker to start loaded it (every worker loads the same spec)."""
        done, _ = self.ray.wait([a.ready for a in self.actors], num_returns=1)
        try:
            identity, _host, _pid = self.ray.get(done[0])
        except self.ray.exceptions.RayActorError as exc:
            raise PipelineError(f"a Ray worker could not start: {_cause(exc)}") from None
        except self.ray.exceptions.RayError as exc:
            raise PipelineError(f"a Ray worker could not load the teacher: {_cause(exc)}") from None
        return identity

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a.handle)
        self.actors = []

    # ---- one split ----
    def run(self, job: FeatureJob, progress: bool = True) -> FeatureSummary:
        ray, start = self.ray, time.perf_counter()
        job.out_dir.mkdir(parents=True, exist_ok=True)
        reader = SplitReader(job.manifest, job.shard_size)
        meta = cache_meta(job, self.identity, reader.total)
        summary = FeatureSummary(split=job.split, out_dir=job.out_dir)
        pending = plan_shards(job, reader, ShardWriter(job.out_dir, meta), summary)
        summary.read_seconds = time.perf_counter() - start
        if not pending:
            summary.seconds = time.perf_counter() - start
            return finish_job(job, meta, summary)
        self._jobs += 1
        ctx = ray.put(_JobContext(self._jobs, job, meta))
        queue, tries, running = deque(pending), {s: 0 for s in pending}, {}  # running: ObjectRef -> actor
        died_at: dict[int, float] = {}  # shard -> when its worker last died
        later: list[tuple[float, int]] = []  # (not before, shard): a dead worker's shard whose lock looked held
        bar = tqdm(total=sum(reader.work(s, meta.views) for s in pending), unit="item",
                   desc=f"{job.dataset}/{job.split}", disable=not progress, smoothing=0.1)
        done_shards, images, last_grow = 0, 0, time.perf_counter()
        while queue or running or later:
            now = time.perf_counter()
            queue.extend(shard for at, shard in later if at <= now)
            later = [(at, shard) for at, shard in later if at > now]
            if not self.options.workers and time.perf_counter() - last_grow > 2.0:
                self._grow()  # a machine joined: more actors
                last_grow = time.perf_counter()
            for a in self.actors:  # hand the next shard to every started, idle actor
                if queue and a.started and a.shard is None:
                    if a.prepared != self._jobs:
                        a.handle.prepare.remote(ctx)  # an actor runs its calls in order
                        a.prepared = self._jobs
                    a.shard = queue.popleft()
                    running[a.handle.run_shard.remote(self._jobs, reader.read(a.shard))] = a
            waiting = list(running) + [a.ready for a in self.actors if not a.started]
            if not waiting:  # only shards waiting for a dead worker's lock to go stale
                time.sleep(RETRY_BUSY_S / 5)
                continue
            ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            for ref in ready:
                a = running.pop(ref, None)
                if a is None:  # an actor finished loading the teacher
                    starter = next(x for x in self.actors if x.ready == ref)
                    self._started(starter)
                    continue
                shard, a.shard = a.shard, None
                try:
                    r = ray.get(ref)
                except ray.exceptions.RayActorError as exc:  # its process or machine died: retry elsewhere
                    self._replace(a)
                    tries[shard] += 1
                    if tries[shard] > self.options.max_retries:
                        raise PipelineError(f"shard {shard} of {job.split}: its worker died {tries[shard]} times "
                                            f"(last: {_cause(exc)}); rerun to resume") from None
                    self.echo(f"note: the worker on shard {shard} died ({_cause(exc)}); retrying it")
                    died_at[shard] = time.perf_counter()
                    queue.appendleft(shard)
                    continue
                except ray.exceptions.RayError as exc:
                    raise PipelineError(f"shard {shard} of {job.split} failed: {_cause(exc)}") from None
                if r["status"] == "busy" and shard in died_at and _lock_may_be_the_dead_workers(died_at[shard]):
                    later.append((time.perf_counter() + RETRY_BUSY_S, shard))
                    continue
                _count(summary, r)
                if r["status"] == "written":
                    self.written_by[r["worker"]] = self.written_by.get(r["worker"], 0) + 1
                    done_shards += 1
                    images += r["images"]
                    bar.update(reader.work(shard, meta.views))
                    rate = images / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"shards {done_shards}/{len(pending)}, {rate:.0f} images/s")
        bar.close()
        summary.seconds = time.perf_counter() - start
        return finish_job(job, meta, summary)

    def _started(self, a: _Actor) -> None:
        try:
            self.ray.get(a.ready)
            a.started = True
        except self.ray.exceptions.RayActorError:
            self._replace(a)

    def _replace(self, a: _Actor) -> None:
        """A dead actor gives way to a new one (bounded: a cluster that kills every actor stops the job)."""
        self.ray.kill(a.handle)
        self.actors.remove(a)
        self.replaced += 1
        if self.replaced > 10 * max(1, len(self.actors) + 1):
            raise PipelineError(f"{self.replaced} Ray workers died; the cluster cannot keep one alive")
        self._start_actor()


def _lock_may_be_the_dead_workers(died: float) -> bool:
    """Whether a lock found on a dead worker's shard may still be that worker's: a same-host holder is seen dead
    within moments (its pid reaped), another host's only after its lease; a lock older than that is a live
    process's (another job), and the shard is left to it."""
    return time.perf_counter() - died <= io.lease_seconds() + 5.0


def _count(summary: FeatureSummary, r: dict) -> None:
    if r["status"] == "busy":
        summary.busy(r["name"])
        return
    if r["status"] == "skipped":
        summary.shards_skipped.append(r["name"])
        return
    summary.written(r["name"], r["images"], r["texts"], r["rejects"])
    summary.read_seconds += r["read"]  # summed over workers: time spent, not wall time
    summary.model_seconds += r["model"]
    summary.write_seconds += r["write"]


def _cause(exc: BaseException) -> str:
    """The one line that matters of a Ray error: the remote exception's own message (the last "SomeError: ..."
    line of the traceback Ray carries), else Ray's first line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        m = re.match(r"^[\w.]*(?:Error|Exception)(?:\([\w.]+\))?: (.+)$", line)
        if m:
            return m.group(1)
    return lines[0] if lines else type(exc).__name__


__all__ = ["RayEngine", "RayOptions", "ShardWorker", "TeacherIdentity", "import_ray", "MISSING"]
