"""What differs between a sweep's commands, behind one small interface the runner drives.

Each command a sweep can name (``command:``) has an adapter: how one run trains (a library call), how the
trained runs are evaluated, and how a table and the headline numbers show them. A new command is one adapter
class plus one line in ADAPTERS, as a teacher backend is one line in pipeline.teachers.BACKENDS.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.common.errors import PipelineError
from pipeline.experiments.sweep import Plan, SweepTable

# Sweep command -> its adapter ("module:Class"), imported when a sweep needs it.
ADAPTERS = {
    "distill": "pipeline.experiments.retrieval_runs:DistillRuns",
    "adapt": "pipeline.experiments.retrieval_runs:AdaptRuns",
    "classify": "pipeline.experiments.classify_runs:ClassifyRuns",
}

Log = Callable[[str], None]


class CommandAdapter(ABC):
    """One command's part in a sweep. ``trainer`` ("module:function") trains one run as the command does:
    ``fn(cfg, resume=..., progress=False)``; the runner calls it in a process of its own."""

    trainer: str = ""

    def train(self, cfg: Any, resume: bool) -> None:
        module, _, name = self.trainer.partition(":")
        getattr(importlib.import_module(module), name)(cfg, resume=resume, progress=False)

    @abstractmethod
    def evaluate(self, plan: Plan, *, tables_only: bool, reevaluate: bool,
                 log: Log) -> tuple[Optional[dict], dict[str, dict]]:
        """(the teacher's record or None, every planned run's record) once the runs are evaluated."""

    def result_settings(self, plan: Plan) -> Optional[dict]:
        """The settings a run's stored stage-3 result must have been measured with to count for this plan (split,
        manifest, teacher cache); an archived result with others is not restored. None: no check."""
        return None

    def read_result(self, plan: Plan) -> Optional[Callable[[str], Optional[dict]]]:
        """How a table reads a run's numbers (None: from its stage-3 result)."""
        return None

    @abstractmethod
    def section(self, plan: Plan, table: SweepTable, rows: list, teacher: Optional[dict], command: str,
                wall: str, figures_dir: Optional[Path], results: Path) -> tuple[str, Optional[Path]]:
        """(the table's Markdown block, its figure or None)."""

    @abstractmethod
    def summary_entry(self, plan: Plan, rows_by_table: dict, teacher: Optional[dict],
                      data_counts: Optional[dict]) -> dict:
        """The sweep's entry in docs/results/summary.json (its tables' headline numbers)."""


def adapter(command: str) -> CommandAdapter:
    """The adapter of a sweep command; an unregistered command is one clear error."""
    if command not in ADAPTERS:
        raise PipelineError(f"the experiment runner has no adapter for command {command!r} "
                            f"(registered: {', '.join(ADAPTERS)})")
    module, _, cls = ADAPTERS[command].partition(":")
    return getattr(importlib.import_module(module), cls)()
