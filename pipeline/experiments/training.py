"""Training a sweep's runs: each in a process of its own (so ``jobs`` of them share a big machine, and one
that crashes or leaks memory takes no other down), calling its command's adapter (the library, not the
command line); its output goes to ``<run>/<command>.log``. An interrupted run is resumed from its checkpoints.
An export row's model is copied in instead of trained."""

from __future__ import annotations

import multiprocessing
import os
import platform
import shlex
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from pipeline.common.errors import PipelineError
from pipeline.common.io import checksum_path
from pipeline.experiments.records import (
    EXPERIMENT_FORMAT, EXPORT, Log, checkpoint_dirs, fmt_time, is_trained, read_record, write_record,
)
from pipeline.experiments.sweep import Plan, PlannedRun


def log_file(plan: Plan) -> str:
    return f"{plan.sweep.command}.log"


def run_command(plan: Plan, run: PlannedRun, resume: bool) -> list[str]:
    """The ``clipdistill <command>`` call equivalent to what trains ``run`` (recorded, and shown in its log)."""
    cmd = ["clipdistill", plan.sweep.command, "--config", str(plan.sweep.base_config)]
    for s in run.sets:
        cmd += ["--set", s]
    cmd += ["--set", f"runs_dir={plan.runs_dir}", "--name", run.name, "--no-progress"]
    return cmd + (["--resume"] if resume else [])


def _train_child(command: str, base_config: str, sets: list[str], resume: bool, log: str,
                 gpu: str | None = None) -> None:
    """A spawned process's whole life: output to the run's log, the run trained through its command's adapter;
    exits as the command line would (a PipelineError: one ``error:`` line and 2). ``gpu``: the one GPU this run
    sees (as cuda:0), set before anything touches CUDA."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    from pipeline.common.runtime import tune_cpu_runtime

    tune_cpu_runtime()
    with open(log, "ab") as f:  # the descriptors, so that native libraries and loader workers write there too
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        from pipeline.common import config as cfgio
        from pipeline.experiments.adapters import adapter
        from pipeline.experiments.sweep import config_class

        adapter(command).train(cfgio.load(config_class(command), base_config, sets), resume)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def _last_error(log: Path) -> str:
    """The trainer's one-line ``error:`` message, else the last line of its output (a traceback's)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no output"
    errors = [ln for ln in lines if ln.startswith("error:")]
    line = errors[-1][len("error:"):].strip() if errors else (lines[-1] if lines else "no output")
    return line[:500]


def _device_of(config: Any) -> str:
    import torch

    from pipeline.common.distributed import resolve_device
    from pipeline.retrieval.evaluate import device_description

    # a run's own thread count where the config sets one (the runner's process may use another)
    return device_description(torch.device(resolve_device(config.device)), getattr(config, "threads", 0))


def copy_export(plan: Plan, run: PlannedRun) -> dict:
    """An export row: the model is copied into its run folder (again when the source is newer), not trained."""
    run_dir = plan.run_dir(run.key)
    source, target = Path(run.export), run_dir / EXPORT
    record = {**read_record(run_dir), "format": EXPERIMENT_FORMAT, "key": run.key, "name": run.name,
              "export": str(source), "command": f"(evaluated as it is: {source})", "sets": [],
              "uses": [{"table": c.table, "label": c.label, "seed": c.seed} for c in run.cells]}
    if not source.is_file():
        record.update(status="failed", error=f"export {source} not found")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        # its checksum goes with it: loaders refuse an export without one (common/io.verify_file)
        if checksum_path(source).is_file():
            shutil.copy2(checksum_path(source), checksum_path(target))
        else:
            checksum_path(target).unlink(missing_ok=True)
        record.update(status="trained", error=None, train_seconds=0.0)
    write_record(run_dir, record)
    return record


def export_is_stale(plan: Plan, run: PlannedRun) -> bool:
    target = plan.run_dir(run.key) / EXPORT
    source = Path(run.export)
    return not target.is_file() or (source.is_file() and source.stat().st_mtime > target.stat().st_mtime)


def visible_gpus(config: Any) -> list[str]:
    """The GPUs runs are spread over: the visible ones (CUDA_VISIBLE_DEVICES' ids, else 0..n-1) when the sweep's
    device is auto or cuda and CUDA is there; [] otherwise (cpu, or a pinned cuda:N that every run shares)."""
    if str(config.device) not in ("auto", "cuda"):
        return []
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (listed if listed else [str(i) for i in range(n)])[:n]


class GpuPool:
    """Hands each starting run the visible GPU with the fewest runs on it (the lowest on a tie): round-robin
    while every GPU has a run, and a finished run's GPU is the next one given out."""

    def __init__(self, gpus: list[str]):
        self.gpus, self.load, self.lock = gpus, {g: 0 for g in gpus}, threading.Lock()

    def acquire(self) -> str | None:
        if not self.gpus:
            return None
        with self.lock:
            gpu = min(self.gpus, key=lambda g: (self.load[g], self.gpus.index(g)))
            self.load[gpu] += 1
            return gpu

    def release(self, gpu: str | None) -> None:
        if gpu is not None:
            with self.lock:
                self.load[gpu] -= 1


def train_run(plan: Plan, run: PlannedRun, device: str, gpu: str | None = None) -> dict:
    """Train one run in a spawned process; returns (and writes) its updated record. Never raises for a run
    that fails: the error goes into the record. ``gpu``: the GPU id the run alone sees."""
    if run.export is not None:
        return copy_export(plan, run)
    run_dir = plan.run_dir(run.key)
    record = read_record(run_dir)
    resume = bool(checkpoint_dirs(run_dir))
    shown = " ".join(shlex.quote(c) for c in run_command(plan, run, resume))
    record.update(format=EXPERIMENT_FORMAT, key=run.key, name=run.name,
                  base_config=str(plan.sweep.base_config), sets=run.sets, command=shown, status="training",
                  error=None, device=device if gpu is None else f"{device} (GPU {gpu})", host=platform.node(), started=time.strftime("%Y-%m-%dT%H:%M:%S"),
                  uses=[{"table": c.table, "label": c.label, "seed": c.seed} for c in run.cells])
    write_record(run_dir, record)
    start = time.perf_counter()
    log = run_dir / log_file(plan)
    with open(log, "ab") as f:
        f.write(f"\n$ {shown}\n".encode())
    # the same settings `clipdistill <command>` would load: the run's overrides, its folder, its name
    sets = [*run.sets, f"runs_dir={plan.runs_dir}", f"name={run.name}"]
    # spawn, not fork: a fresh interpreter (no copy of this process's threads, locks or CUDA state)
    child = multiprocessing.get_context("spawn").Process(
        target=_train_child, args=(plan.sweep.command, str(plan.sweep.base_config), sets, resume, str(log), gpu))
    child.start()
    child.join()
    code = child.exitcode
    seconds = time.perf_counter() - start
    # Wall-clock adds up over attempts (a resumed run's total is what it cost).
    record["train_seconds"] = float(record.get("train_seconds") or 0.0) + seconds
    record["attempts"] = int(record.get("attempts") or 0) + 1
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if code == 0 and is_trained(run_dir):
        record["status"] = "trained"
    else:
        record["status"] = "failed"
        record["error"] = f"{plan.sweep.command} exited with {code}: {_last_error(log)}"
    write_record(run_dir, record)
    return record


def _uses(run: PlannedRun) -> str:
    first = run.cells[0]
    more = len({c.table for c in run.cells}) - 1
    return f"{first.table}: {first.label}, seed {first.seed}" + (f"; +{more} other table(s)" if more else "")


def train_all(plan: Plan, jobs: int = 1, max_runs: int = 0, skip_failed: bool = False,
              log: Log = print) -> dict[str, dict]:
    """Train every planned run without an export, ``jobs`` at a time; returns records by key.

    Runs that failed before are tried again (resumed from their last checkpoint if they have one)
    unless ``skip_failed``, which keeps their recorded error instead.
    """
    if jobs < 1:
        raise PipelineError(f"--jobs must be at least 1, got {jobs}")
    todo = [r for r in plan.runs.values()
            if (export_is_stale(plan, r) if r.export is not None else not is_trained(plan.run_dir(r.key)))]
    done = len(plan.runs) - len(todo)
    if done:
        log(f"{done} of {len(plan.runs)} runs already trained: skipped")
    if skip_failed:
        failed = [r for r in todo if read_record(plan.run_dir(r.key)).get("status") == "failed"]
        if failed:
            log(f"--skip-failed: {len(failed)} run(s) that failed before not tried again")
            todo = [r for r in todo if r not in failed]
    if max_runs and len(todo) > max_runs:
        log(f"--max-runs {max_runs}: training {max_runs} of the {len(todo)} runs left")
        todo = todo[:max_runs]
    records: dict[str, dict] = {}
    if not todo:
        return records
    device = _device_of(plan.base)
    gpus = GpuPool(visible_gpus(plan.base))  # each run on a GPU of its own while there are enough
    if gpus.gpus:
        together = min(jobs, len(todo))
        log(f"{together} run(s) at a time over {len(gpus.gpus)} GPU(s) ({', '.join(gpus.gpus)}), one each"
            if together <= len(gpus.gpus) else
            f"note: {together} runs at a time share {len(gpus.gpus)} GPU(s) ({', '.join(gpus.gpus)}): up to "
            f"{-(-together // len(gpus.gpus))} runs per GPU")
    elif jobs > 1 and not getattr(plan.base, "threads", 0) and min(jobs, len(todo)) > 1:
        cores = os.cpu_count() or 1
        log(f"note: {min(jobs, len(todo))} runs at a time on {cores} CPU core(s), each with torch's default of one "
            f"thread per core: they oversubscribe the cores; set threads (the sweep's set: or --set threads="
            f"{max(1, cores // jobs)}) for more runs an hour")
    lock, finished, durations, t0 = threading.Lock(), [0], [], time.perf_counter()
    total = len(todo)

    def one(i: int, run: PlannedRun) -> dict:
        gpu = gpus.acquire()
        with lock:
            log(f"[{i}/{total}] train {run.name} ({_uses(run)})" + (f" on GPU {gpu}" if gpu is not None else ""))
        try:
            return train_run(plan, run, device, gpu)
        except Exception as exc:  # e.g. a full disk while writing the log: record it, let the others go on
            record = {**read_record(plan.run_dir(run.key)), "status": "failed",
                      "error": f"runner: {type(exc).__name__}: {exc}"}
            write_record(plan.run_dir(run.key), record)
            return record
        finally:
            gpus.release(gpu)

    # threads only wait here: each run's work is in its own process
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(one, i + 1, r): r for i, r in enumerate(todo)}
        for fut in as_completed(futures):
            run = futures[fut]
            rec = fut.result()
            records[run.key] = rec
            with lock:
                finished[0] += 1
                left = total - finished[0]
                if rec["status"] != "failed":
                    durations.append(float(rec.get("train_seconds") or 0.0))
                # Runs are alike, so the mean successful run over `jobs` parallel slots estimates the rest.
                eta = fmt_time(sum(durations) / len(durations) * left / jobs) if durations else "unknown"
                took = fmt_time(time.perf_counter() - t0)
                if rec["status"] == "failed":
                    log(f"[{finished[0]}/{total}] FAILED {run.name}: {rec['error']}")
                else:
                    log(f"[{finished[0]}/{total}] trained {run.name} in {fmt_time(durations[-1])}; "
                        f"{left} left, ETA {eta} ({took} elapsed)")
    return records
