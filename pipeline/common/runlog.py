"""Run metrics: JSON lines (everything), one CSV per record kind, and TensorBoard scalars."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path


class RunLogger:
    """Append-only; a resumed run keeps writing to the same files. Inactive on non-main ranks."""

    def __init__(self, run_dir: Path, active: bool = True, tensorboard: bool = True):
        self.run_dir, self.active = Path(run_dir), active
        # records in metrics.jsonl so far: a checkpoint stores it, so a resume keeps exactly what preceded it
        self.records = len(_lines(self.run_dir)) if active else 0
        self._tb = None
        if active and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:  # tensorboard is optional at run time; JSON/CSV still record everything
                self._tb = None

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.active:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.records += 1
        path = self.run_dir / f"{kind}.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(record), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(record)
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _lines(run_dir: Path) -> list[str]:
    path = Path(run_dir) / "metrics.jsonl"
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in _lines(run_dir)]
    return [r for r in rows if kind is None or r["kind"] == kind]


def truncate_after(run_dir: Path, step: int, records: int | None = None) -> None:
    """Drop the records a killed run logged after its last checkpoint (that work is redone on resume).

    ``records``: how many records the checkpoint saw (RunLogger.records); the first that many are kept, which is
    exact even when the kill landed between an epoch's validation record and the epoch-end checkpoint (both at
    the same step) and drops a line torn by the kill. Without it (older checkpoints): records up to ``step``.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        return
    if records is not None:
        kept = [json.loads(line) for line in _lines(run_dir)[:records]]
    else:
        kept = [r for r in read_metrics(run_dir) if r["step"] <= step]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    for path in run_dir.glob("*.csv"):
        kind = path.stem
        rows = [r for r in kept if r["kind"] == kind]
        path.unlink()
        if rows:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]), extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
