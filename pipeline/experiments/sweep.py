"""Sweep files and their plan: which distill configs a set of experiment tables needs (pipeline.experiments.runner).

A sweep file (YAML) names a base distill config, global overrides, the stage-3 settings and tables; each
table has rows ``{label, set: {dotted.key: value}}`` and seeds::

    name: openmoji
    base_config: configs/openmoji-small.yaml
    set: {device: auto}                         # applied to every run
    eval: {split: test, teacher_spec: "lit:artifacts/teachers/lit-openmoji.pt"}
    tables:
      - id: balancer
        title: Loss balancer
        description: ...
        seeds: [0, 1, 2]
        teacher: false                          # add the teacher's row (from its cache)
        cost: false                             # add FLOPs and latency columns
        rows:
          - {label: dynamic, set: {balancer.kind: dynamic}}

``archive: DIR`` keeps every finished run's record and stage-3 result in DIR (a few KB a run, meant to be
committed) and restores runs from it instead of training them again (pipeline.experiments.archive).

``command: adapt`` makes the runs adaptations (``clipdistill adapt``, AdaptConfig; ``eval.cache_dir`` then names
the teacher cache, as adapt configs have none), and a row ``{label, export: PATH}`` evaluates an existing model
as it is (an adaptation's start point) instead of training one. ``command: classify`` makes them classification
experiments (``clipdistill classify``, ClassifyConfig: head + probe, then student generations), which evaluate
themselves on their test split; their tables come from pipeline.experiments.classify_tables.

Every (row, seed) becomes a resolved ``DistillConfig`` (or AdaptConfig): base <- sweep ``set`` <- row ``set`` <- ``seed`` <-
command-line ``--set``. Identical configs are trained once, whichever tables use them: a run's folder is
named by :func:`run_key`, a hash of its resolved config without the keys that do not change what is
trained (:data:`BOOKKEEPING_KEYS`), so reordering or renaming rows reuses finished runs.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from pipeline.common import config as cfgio
from pipeline.common.errors import PipelineError

# Config keys that do not change what a run learns; left out of the run key, so e.g. a CPU test run and
# a GPU run of the same settings are one run (the device each ran on is recorded).
BOOKKEEPING_KEYS = ("name", "runs_dir", "device", "log_every", "checkpoint_every", "data.workers",
                    "data.preload_limit_gb", "eval_batch_size", "distill.workers")
# Keys added after runs were first hashed: left out at their default value, so existing runs keep their keys.
ADDED_KEYS = {"losses.extra": {}, "optim.min_steps": 0, "data.transfer": (), "data.transfer_ratio": 0.0,
              "data.views": 0, "distill.init_weights": "", "distill.precision": "auto", "inherit.text_from": "",
              "inherit.text_layers": (), "inherit.text_projection": True, "teacher_text": "", "threads": 0}
# Keys added to one config class only: a classification run's precision (once distill.precision) is new to its
# key, while distill and adapt runs have always hashed theirs, so it is left out for classification runs alone.
ADDED_KEYS_OF = {"ClassifyConfig": {"precision": "auto"}}
_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
EVAL_DIR = "eval"  # a run's stage-3 folder, <runs_dir>/<name>/eval (pipeline.retrieval.evaluate outputs)


# ---- sweep file ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSection:
    """Stage-3 settings shared by every run of a sweep (as `clipdistill eval` options)."""

    split: str = "test"
    teacher_spec: Optional[str] = None  # to measure the teacher's params/latency; recalls come from its cache
    index: str = "exact"
    max_captions_per_image: Optional[int] = None
    latency_repeats: int = 20  # 0: no latency measurement
    # The teacher cache of the evaluated split (its teacher row; runs of another teacher are skipped). Default: the
    # base config's data.cache_dir; an adapt sweep, whose configs have none, names one here or has no teacher row.
    cache_dir: Optional[str] = None
    batch_size: int = 64
    workers: int = 2


@dataclass(frozen=True)
class SweepRow:
    label: str
    sets: dict[str, Any]
    export: Optional[str] = None  # a model to evaluate as it is (e.g. an adaptation's start), not a run to train


@dataclass(frozen=True)
class Claim:
    """A published statement a table tests: row ``better`` scores above each row of ``than`` (paired by seed)."""

    text: str
    better: str
    than: tuple[str, ...]
    source: str = ""


@dataclass(frozen=True)
class SweepTable:
    id: str
    title: str
    description: str
    seeds: tuple[int, ...]
    rows: tuple[SweepRow, ...]
    teacher: bool = False
    cost: bool = False
    # extra paired differences (row a - row b) besides each row - the first row, e.g. one setting of two rows
    differences: tuple[tuple[str, str], ...] = ()
    claims: tuple[Claim, ...] = ()  # published statements this table tests


# The commands a sweep's runs are trained with, and their config classes ("module:Class", imported when planned).
COMMANDS = {"distill": "pipeline.distill.trainer:DistillConfig", "adapt": "pipeline.adapt.trainer:AdaptConfig",
            "classify": "pipeline.classify.config:ClassifyConfig"}


def _differences(raw: Any, labels: set[str], where: str) -> tuple[tuple[str, str], ...]:
    """A table's ``differences:``, a list of [row a, row b] labels (each reads "a - b")."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise PipelineError(f"{where}: a list of [row a, row b] label pairs, got {raw!r}")
    out = []
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise PipelineError(f"{where}: each entry is [row a, row b] (two row labels), got {pair!r}")
        unknown = [x for x in pair if x not in labels]
        if unknown:
            raise PipelineError(f"{where}: no row labelled {unknown[0]!r} in this table")
        out.append((pair[0], pair[1]))
    return tuple(out)


def _claims(raw: Any, labels: set[str], where: str) -> tuple[Claim, ...]:
    """A table's ``claims:``, a list of {claim: text, better: row, than: row or [rows], source: text}."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise PipelineError(f"{where}: a list of {{claim, better, than, source}} mappings, got {raw!r}")
    out = []
    for i, item in enumerate(raw):
        cwhere = f"{where}[{i}]"
        item = _mapping(item, cwhere)
        _only_keys(item, {"claim", "better", "than", "source"}, cwhere)
        text, better = str(item.get("claim") or "").strip(), item.get("better")
        than = item.get("than")
        than = [than] if isinstance(than, str) else than
        if not text or not isinstance(better, str) or not isinstance(than, list) or not than \
                or not all(isinstance(x, str) for x in than):
            raise PipelineError(f"{cwhere}: needs claim (text), better (a row label) and than (a row label or a "
                                f"list of them)")
        unknown = [x for x in [better, *than] if x not in labels]
        if unknown:
            raise PipelineError(f"{cwhere}: no row labelled {unknown[0]!r} in this table")
        if better in than:
            raise PipelineError(f"{cwhere}: row {better!r} is compared with itself")
        out.append(Claim(text, better, tuple(dict.fromkeys(than)), str(item.get("source") or "").strip()))
    return tuple(out)


def config_class(command: str) -> type:
    import importlib

    module, _, name = COMMANDS[command].partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    base_config: Path
    sets: dict[str, Any]
    eval: EvalSection
    tables: tuple[SweepTable, ...]
    command: str = "distill"  # what trains a run: clipdistill distill (DistillConfig) or adapt (AdaptConfig)
    archive: Optional[Path] = None  # where finished runs' results are kept (pipeline.experiments.archive)

    def table(self, table_id: str) -> SweepTable:
        for t in self.tables:
            if t.id == table_id:
                return t
        raise PipelineError(f"sweep {self.path} has no table {table_id!r}; tables: "
                            f"{', '.join(t.id for t in self.tables)}")


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PipelineError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _only_keys(data: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PipelineError(f"{where}: unknown key(s) {unknown}; valid: {sorted(allowed)}")


def _sets(value: Any, where: str) -> dict[str, Any]:
    sets = _mapping(value, where)
    for key in sets:
        if not isinstance(key, str) or not key.strip():
            raise PipelineError(f"{where}: override keys must be dotted config names, got {key!r}")
    return dict(sets)


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file; every problem is a one-line PipelineError naming where it is."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"sweep file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"cannot parse {path}: {exc}".splitlines()[0]) from None
    data = _mapping(data, str(path))
    _only_keys(data, {"name", "base_config", "set", "eval", "tables", "command", "archive"}, str(path))
    command = str(data.get("command") or "distill")
    if command not in COMMANDS:
        raise PipelineError(f"{path}: command must be one of {', '.join(COMMANDS)}, not {command!r}")
    if not data.get("base_config"):
        raise PipelineError(f"{path}: base_config (a distill config file) is required")
    eval_section = cfgio.from_dict(EvalSection, _mapping(data.get("eval"), f"{path}: eval"), "eval.")
    raw_tables = data.get("tables") or []
    if not isinstance(raw_tables, list) or not raw_tables:
        raise PipelineError(f"{path}: tables must be a non-empty list")
    tables, seen = [], set()
    for i, raw in enumerate(raw_tables):
        where = f"{path}: tables[{i}]"
        raw = _mapping(raw, where)
        _only_keys(raw, {"id", "title", "description", "seeds", "rows", "teacher", "cost", "differences", "claims"},
                   where)
        tid = str(raw.get("id", ""))
        if not _ID_RE.match(tid):
            raise PipelineError(f"{where}: id must be letters, digits, '-' or '_', got {tid!r}")
        if tid in seen:
            raise PipelineError(f"{where}: duplicate table id {tid!r}")
        seen.add(tid)
        seeds = raw.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                for s in seeds):
            raise PipelineError(f"{where} ({tid}): seeds must be a non-empty list of integers, got {seeds!r}")
        rows, labels = [], set()
        for j, row in enumerate(raw.get("rows") or []):
            rwhere = f"{where} ({tid}) rows[{j}]"
            row = _mapping(row, rwhere)
            _only_keys(row, {"label", "set", "export"}, rwhere)
            label = str(row.get("label", "")).strip()
            if not label or label in labels:
                raise PipelineError(f"{rwhere}: each row needs a unique, non-empty label (got {label!r})")
            labels.add(label)
            if row.get("export") is not None and row.get("set"):
                raise PipelineError(f"{rwhere}: a row evaluates an export or trains with set, not both")
            rows.append(SweepRow(label, _sets(row.get("set"), rwhere),
                                 str(row["export"]) if row.get("export") is not None else None))
        if not rows and not raw.get("teacher", False):  # a table of the teacher alone is fine
            raise PipelineError(f"{where} ({tid}): no rows (and no teacher: true)")
        tables.append(SweepTable(tid, str(raw.get("title") or tid), str(raw.get("description") or ""),
                                 tuple(dict.fromkeys(seeds)), tuple(rows), bool(raw.get("teacher", False)),
                                 bool(raw.get("cost", False)),
                                 _differences(raw.get("differences"), labels, f"{where} ({tid}) differences"),
                                 _claims(raw.get("claims"), labels, f"{where} ({tid}) claims")))
    for key in ("differences", "claims"):  # a classify sweep's tables pair columns, not rows
        if command == "classify" and any(getattr(t, key) for t in tables):
            raise PipelineError(f"{path}: {key}: is for retrieval tables (distill, adapt), not classify sweeps")
    return Sweep(path, str(data.get("name") or path.stem), Path(data["base_config"]),
                 _sets(data.get("set"), f"{path}: set"), eval_section, tuple(tables), command,
                 Path(data["archive"]) if data.get("archive") else None)


def override_strings(sets: dict[str, Any]) -> list[str]:
    """``{"a.b": v}`` -> ``["a.b=<v as YAML>"]``, the form ``--set`` and ``config.load`` take."""
    out = []
    for key, value in sets.items():
        if isinstance(value, str) and yaml.safe_load(value) == value and "\n" not in value:
            text = value
        else:
            text = json.dumps(value)  # JSON is YAML: lists, mappings, booleans and null round-trip
        out.append(f"{key}={text}")
    return out


def run_key(config: Any) -> str:
    """Hash of a resolved run config without :data:`BOOKKEEPING_KEYS`: equal keys train the same run."""
    flat = cfgio.flatten(cfgio.to_dict(config))  # tuples hash like lists: json writes both as arrays
    added = {**ADDED_KEYS, **ADDED_KEYS_OF.get(type(config).__name__, {})}
    kept = {k: v for k, v in flat.items()
            if k not in BOOKKEEPING_KEYS and not (k in added and v == added[k])}
    blob = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()




@dataclass
class Cell:
    """One (table, row, seed) of a sweep: the run that serves it, or why there is none."""

    table: str
    label: str
    seed: int
    key: Optional[str] = None
    error: Optional[str] = None


@dataclass
class PlannedRun:
    key: str
    name: str
    config: Any  # the sweep command's config (DistillConfig, AdaptConfig); None for an export row
    sets: list[str]  # overrides on top of the base config, in order
    cells: list[Cell] = field(default_factory=list)
    export: Optional[str] = None  # an export row: this model is copied in and evaluated, nothing trains


@dataclass
class Plan:
    sweep: Sweep
    runs_dir: Path
    global_sets: list[str]
    tables: list[SweepTable]
    cells: list[Cell]
    runs: dict[str, PlannedRun]  # by key, in first-use order
    base: Any  # base config (+ sweep and global sets): data paths and device for evaluation

    def run_dir(self, key: str) -> Path:
        return self.runs_dir / self.runs[key].name

    @property
    def teacher_cache_dir(self) -> Optional[str]:
        """The teacher cache evaluation uses: eval.cache_dir, else the base config's data.cache_dir, else None."""
        return self.sweep.eval.cache_dir or getattr(self.base.data, "cache_dir", None) or None

    def eval_dir(self, key: str) -> Path:
        return self.run_dir(key) / EVAL_DIR

    def table_cells(self, table_id: str) -> list[Cell]:
        return [c for c in self.cells if c.table == table_id]


def plan_sweep(sweep: Sweep, runs_dir: str | Path, global_sets: Sequence[str] = (),
               only: Sequence[str] = ()) -> Plan:
    """Resolve every (table, row, seed) of the chosen tables into configs and deduplicate them.

    A cell whose overrides do not make a valid config gets ``error`` and no run; the others still plan.
    """
    config_cls = config_class(sweep.command)  # torch-heavy; only needed once a sweep is planned
    runs_dir = Path(runs_dir)
    tables = [sweep.table(t) for t in dict.fromkeys(only)] if only else list(sweep.tables)
    sweep_sets = override_strings(sweep.sets)
    base = cfgio.load(config_cls, sweep.base_config, [*sweep_sets, *global_sets])
    cells: list[Cell] = []
    runs: dict[str, PlannedRun] = {}
    for table in tables:
        for row in table.rows:
            for seed in table.seeds:
                cell = Cell(table.id, row.label, seed)
                cells.append(cell)
                if row.export is not None:  # one evaluation serves every seed of the row
                    key = hashlib.sha256(f"export:{Path(row.export).resolve()}".encode()).hexdigest()
                    runs.setdefault(key, PlannedRun(key, f"e{key[:12]}", None, [], export=row.export))
                    runs[key].cells.append(cell)
                    cell.key = key
                    continue
                sets = [*sweep_sets, *override_strings(row.sets), f"seed={seed}", *global_sets]
                try:
                    config = cfgio.load(config_cls, sweep.base_config, sets)
                except PipelineError as exc:
                    cell.error = f"invalid config: {exc}"
                    continue
                key = run_key(config)
                if key not in runs:
                    name = f"x{key[:12]}"
                    config = cfgio.from_dict(config_cls, {**cfgio.to_dict(config), "name": name,
                                                          "runs_dir": str(runs_dir)})
                    runs[key] = PlannedRun(key, name, config, sets)
                runs[key].cells.append(cell)
                cell.key = key
    return Plan(sweep, runs_dir, list(global_sets), tables, cells, runs, base)
