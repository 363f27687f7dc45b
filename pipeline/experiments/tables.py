"""Results of a sweep (pipeline.experiments.runner) as Markdown tables and bar charts in a hand-edited document.

Each table is written between ``<!-- table:ID:start -->`` and ``<!-- table:ID:end -->``; regenerating
replaces only that span, so commentary written anywhere else in the document survives. A table missing
from the document is appended at its end.

Cells are aggregated per row over its seeds: mean +- sample standard deviation (n - 1) when more than one
seed finished, and the number of seeds behind each mean. "% of teacher RSUM" uses the teacher evaluated
from its cache on the same split (method.md section 2).
"""

from __future__ import annotations

import os
import re
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from matplotlib.figure import Figure

from pipeline.common.errors import PipelineError
from pipeline.retrieval.evaluate import read_result
from pipeline.experiments.sweep import Claim, Plan, SweepTable
from pipeline.common import io

VAL_RSUM = "best_val_rsum"  # a run's best-epoch val RSUM, the score it was selected by (records.record_val_rsum)

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
METRIC_LABELS = ("i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "RSUM")


def start_marker(table_id: str) -> str:
    return f"<!-- table:{table_id}:start -->"


def end_marker(table_id: str) -> str:
    return f"<!-- table:{table_id}:end -->"


@dataclass
class RowStats:
    """One table row: per-seed results that finished, and what did not."""

    label: str
    planned: int
    results: list[dict] = field(default_factory=list)  # stage-3 records (pipeline.retrieval.evaluate), or what
    # row_stats was told to read
    seeds: list[int] = field(default_factory=list)  # the seed of each entry of results (pairs runs across rows)
    flops: Optional[dict] = None
    errors: list[str] = field(default_factory=list)  # "seed N: why"
    pending: int = 0

    def values(self, metric: str) -> list[float]:
        return [float(r["metrics"][metric]) for r in self.results]

    def by_seed(self, metric: str) -> dict[int, float]:
        """Seed -> value for the results that have ``metric`` (e.g. VAL_RSUM, which older records lack)."""
        return {s: float(r["metrics"][metric]) for s, r in zip(self.seeds, self.results) if metric in r["metrics"]}


def mean_std(values: Sequence[float], digits: int = 1) -> str:
    """``"12.3"`` for one value, ``"12.3 ± 0.4"`` (sample std) for several, ``"-"`` for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def row_stats(plan: Plan, table: SweepTable, records: dict[str, dict],
              read: Optional[Callable[[str], dict]] = None) -> list[RowStats]:
    """Collect each row's finished results from the runs that serve its cells: ``read(key)`` (default: the run's
    stage-3 result).

    Seeds whose configs coincide (e.g. a global ``--set seed=0``) are one run and count once.
    """
    read = read or (lambda key: read_result(plan.eval_dir(key)))
    rows = []
    for row in table.rows:
        cells = [c for c in plan.table_cells(table.id) if c.label == row.label]
        keys = {c.key for c in cells if c.key}
        out = RowStats(row.label, len(keys) + sum(1 for c in cells if c.error))
        seen: set[str] = set()
        for cell in cells:
            if cell.error:
                out.errors.append(f"seed {cell.seed}: {cell.error}")
                continue
            if cell.key in seen:
                continue
            seen.add(cell.key)
            rec = records.get(cell.key) or {}
            if rec.get("status") == "done":
                result = read(cell.key)
                if rec.get("best_val_rsum") is not None and isinstance(result.get("metrics"), dict):
                    # the selection split's score beside the test metrics (records.record_val_rsum)
                    result = {**result, "metrics": {**result["metrics"], VAL_RSUM: float(rec["best_val_rsum"])}}
                out.results.append(result)
                out.seeds.append(cell.seed)
                out.flops = out.flops or rec.get("flops")
            elif rec.get("status") == "failed":
                out.errors.append(f"seed {cell.seed} ({plan.runs[cell.key].name}): {rec.get('error')}")
            else:
                out.pending += 1
        rows.append(out)
    return rows


def seeds_cell(row: RowStats) -> str:
    """How many seeds a row's means stand on: "3", or "2 of 3" while runs are missing or failed."""
    n = len(row.results)
    return str(n) if n == row.planned else f"{n} of {row.planned}"


def _params(result: dict) -> str:
    total = (result.get("params") or {}).get("total")
    if total is None:
        return "-"
    return f"{total / 1e6:.1f}M" if total >= 1e7 else f"{total / 1e6:.2f}M"


def _flops(flops: Optional[dict]) -> str:
    if not flops:
        return "-"
    return f"{flops['image'] / 1e9:.3f} / {flops['text'] / 1e9:.3f}"


def _latency(results: Sequence[dict]) -> str:
    speeds = [r["speed"] for r in results if r.get("speed")]
    if not speeds:
        return "-"
    img = mean_std([1e3 * s["image_latency_s"] for s in speeds], 2)
    txt = mean_std([1e3 * s["text_latency_s"] for s in speeds], 2)
    return f"{img} / {txt}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """A Markdown table: the first ``text_columns`` columns left-aligned, the numbers after them right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])


def render_table(table: SweepTable, rows: list[RowStats], teacher: Optional[dict]) -> str:
    """The Markdown table of one sweep table (teacher row first when the table asks for it)."""
    header = ["Row", "Seeds", "Params"]
    if table.cost:
        header += ["GFLOPs img / txt", "Latency img / txt (ms)"]
    header += [*METRIC_LABELS, "% of teacher RSUM"]
    teacher_rsum = teacher["metrics"]["rsum"] if teacher else None
    lines = []
    if table.teacher and teacher is not None:
        line = [f"teacher ({teacher['name']})", "-", _params(teacher)]
        if table.cost:
            line += [_flops(teacher.get("flops")), _latency([teacher])]
        line += [f"{teacher['metrics'][m]:.1f}" for m in METRICS] + ["100.0%"]
        lines.append(line)
    for r in rows:
        line = [r.label, seeds_cell(r), _params(r.results[0]) if r.results else "-"]
        if table.cost:
            line += [_flops(r.flops) if r.results else "-", _latency(r.results)]
        line += [mean_std(r.values(m)) for m in METRICS]
        if teacher_rsum and r.results:
            line.append(mean_std([100.0 * v / teacher_rsum for v in r.values("rsum")]) + "%")
        else:
            line.append("-")
        lines.append(line)
    return markdown(header, lines)


def wall_clock(plan: Plan, table: SweepTable, records: dict[str, dict]) -> str:
    """Sum of the table's runs' training and evaluation wall-clock, and the devices they ran on."""
    keys = list(dict.fromkeys(c.key for c in plan.table_cells(table.id) if c.key))
    recs = [records.get(k) or {} for k in keys]
    train = sum(float(r.get("train_seconds") or 0.0) for r in recs)
    evaluation = sum(float(r.get("eval_seconds") or 0.0) for r in recs)
    devices = sorted({f"{r['device']} on {r.get('host') or '?'}" for r in recs if r.get("device")})
    shared = sum(1 for k in keys if len({c.table for c in plan.runs[k].cells}) > 1)
    note = f" ({shared} shared with other tables and counted in each)" if shared else ""
    done = sum(1 for r in recs if r.get("status") == "done")
    return (f"Wall-clock: {train / 60:.1f} min training + {evaluation / 60:.1f} min evaluation, summed over "
            f"{len(keys)} unique runs{note}, {done} finished; device: {', '.join(devices) or 'none yet'}.")


def bar_figure(table: SweepTable, rows: list[RowStats], teacher: Optional[dict],
               path: Path) -> Optional[Path]:
    """RSUM per row (mean, error bar = std over seeds) with the teacher's RSUM as a line; None if no data.

    Horizontal bars, so row labels of any length read on one line each; the title wraps to the figure's width and
    the legend sits below the axes, never over a bar."""
    done = [r for r in rows if r.results]
    if not done:
        return None
    means = [statistics.mean(r.values("rsum")) for r in done]
    errs = [statistics.stdev(r.values("rsum")) if len(r.results) > 1 else 0.0 for r in done]
    width = 8.0
    title = textwrap.fill(table.title, width=int(width * 11))  # ~11 characters per inch at 10 pt
    fig = Figure(figsize=(width, 1.6 + 0.4 * len(done) + 0.2 * title.count("\n")), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(range(len(done)), means, xerr=errs, capsize=3, color="tab:blue")
    ax.set_yticks(range(len(done)), [textwrap.shorten(r.label, 60, placeholder="...") for r in done])
    ax.invert_yaxis()  # the table's first row on top
    if teacher is not None:
        ax.axvline(teacher["metrics"]["rsum"], ls="--", color="tab:gray", label=f"teacher: {teacher['name']}")
        fig.legend(loc="outside lower left", frameon=False)  # below the axes: never over a bar or the x label
    ax.set_xlabel("test RSUM")
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")  # the figure's width, not the axes' (labels take room)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def section(table: SweepTable, rows: list[RowStats], teacher: Optional[dict], command: str, wall: str,
            figure: Optional[str] = None) -> str:
    """The marker-delimited block of one table."""
    parts = [start_marker(table.id), f"### {table.title}", ""]
    if table.description:
        parts += [table.description.strip(), ""]
    diffs = render_differences(row_differences(rows, extra=table.differences))
    claims = render_claims(check_claims(table, rows))
    parts += [render_table(table, rows, teacher), "", *(block + "\n" for block in (diffs, claims) if block),
              seeds_note(table, rows), *errors_note(rows)]
    parts += ["", wall, "", f"Regenerate: `{command}`"]
    if figure:
        parts += ["", f"![{table.id}]({figure})"]
    parts.append(end_marker(table.id))
    return "\n".join(parts)


def seeds_note(table: SweepTable, rows: list[RowStats]) -> str:
    n_seeds = len(table.seeds)
    seeds = ", ".join(map(str, table.seeds))
    if n_seeds > 1 and any(len(r.results) < n_seeds for r in rows):  # a row short of seeds must not read as n seeds
        note = f"Mean ± sample std over the seeds each row's seeds column gives ({n_seeds} planned: {seeds})."
    else:
        note = f"Mean ± sample std over {n_seeds} seeds (seeds {seeds})." if n_seeds > 1 else f"One seed ({seeds})."
    pending = sum(r.pending for r in rows)
    return note + (f"\n{pending} run(s) not finished yet." if pending else "")


def errors_note(rows: list[RowStats]) -> list[str]:
    errors = [f"- {r.label}, {e}" for r in rows for e in r.errors]
    return ["", "Failed:", *errors] if errors else []


def update_document(path: Path, blocks: dict[str, str], title: str) -> Path:
    """Replace each table's marked span in ``path`` (created with ``title`` if missing); keep the rest."""
    path = Path(path)
    text = path.read_text() if path.exists() else f"# {title}\n"
    for table_id, block in blocks.items():
        start, end = start_marker(table_id), end_marker(table_id)
        n_start, n_end = text.count(start), text.count(end)
        if n_start == n_end == 0:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
            continue
        if n_start != 1 or n_end != 1 or text.index(start) > text.index(end):
            raise PipelineError(f"{path}: markers of table {table_id!r} are broken (need exactly one "
                                f"{start} followed by one {end}); fix them by hand")
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        text = pattern.sub(lambda _: block, text, count=1)
    return io.write_text(path, text)


def relative_link(target: Path, document: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), Path(document).resolve().parent)).as_posix()


# ---- paired differences: each seed with and without a change ------------------------------------------------------
CLEARS = 2.0  # a difference clears the spread when |mean| > CLEARS x the std of its per-seed differences
MIN_SEEDS = 3  # fewer seeds give no verdict: the std of two differences says little


@dataclass
class Difference:
    """``a - b`` of a test metric (points) for the seeds both sides finished, ascending seed."""

    name: str
    seeds: list[int]
    values: list[float]

    @property
    def verdict(self) -> str:
        if not any(self.values):  # e.g. a part a row's override leaves alone: the same model on both sides
            return "the same in every seed"
        if len(self.values) < MIN_SEEDS:
            return "too few seeds"
        mean, std = statistics.mean(self.values), statistics.stdev(self.values)
        return "clears the spread" if abs(mean) > CLEARS * std else "inside the spread"

    def as_dict(self) -> dict:
        return {"name": self.name, "seeds": self.seeds, **stats(self.values), "verdict": self.verdict}


def paired(name: str, a: dict[int, float], b: dict[int, float]) -> Optional[Difference]:
    seeds = sorted(set(a) & set(b))
    return Difference(name, seeds, [a[s] - b[s] for s in seeds]) if seeds else None


def row_differences(rows: list[RowStats], metric: str = "rsum",
                    extra: Sequence[tuple[str, str]] = ()) -> list[Difference]:
    """Each row - the first row, then each ``extra`` (row a, row b) as a - b; seed by seed (the rows of a table
    run the same seeds)."""
    by_label = {row.label: row for row in rows}
    pairs = [(row, rows[0]) for row in rows[1:]]
    pairs += [(by_label[a], by_label[b]) for a, b in extra if a in by_label and b in by_label]
    out = [paired(f"{a.label} - {b.label}", a.by_seed(metric), b.by_seed(metric)) for a, b in pairs]
    return [d for d in out if d is not None and len(d.values) > 1]


def render_differences(diffs: list[Difference], what: str = "test RSUM") -> str:
    if not diffs:
        return ""
    lines = [[d.name, str(len(d.values)), " / ".join(f"{v:+.1f}" for v in d.values), mean_std(d.values), d.verdict]
             for d in diffs]
    header = [f"Difference ({what}, points)", "Seeds", "per seed", "mean ± std", "verdict"]
    return "\n".join([
        f"<details><summary>Paired differences of {what} (the same seed on both sides; a difference clears the "
        f"spread when |mean| > {CLEARS:g} x the std of its per-seed differences, over at least {MIN_SEEDS} "
        "seeds)</summary>",
        "", markdown(header, lines), "", "</details>"])


# ---- a table's claims: published statements tested on its rows, seed by seed ---------------------------------------
@dataclass
class ClaimCheck:
    """``claim.better - other`` for each row of ``claim.than``, paired by seed (None: no seed both sides finished)."""

    claim: Claim
    comparisons: list[tuple[str, Optional[Difference]]]

    @staticmethod
    def comparison_verdict(diff: Optional[Difference]) -> str:
        """holds / reversed (each clears the spread, one way or the other), not shown (inside it), pending."""
        if diff is None or diff.verdict == "too few seeds":
            return "pending"
        if diff.verdict == "clears the spread":
            return "holds" if statistics.mean(diff.values) > 0 else "reversed"
        return "not shown"

    @property
    def verdict(self) -> str:
        found = [self.comparison_verdict(d) for _, d in self.comparisons]
        if "pending" in found:
            return "pending"
        if "reversed" in found:
            return "contradicted"
        holds = found.count("holds")
        if holds == len(found):
            return "holds"
        return f"holds against {holds} of {len(found)}" if holds else "not shown"

    def as_dict(self) -> dict:
        return {"claim": self.claim.text, "source": self.claim.source, "better": self.claim.better,
                "than": list(self.claim.than), "verdict": self.verdict,
                "comparisons": [{"than": other, **({} if d is None else {**d.as_dict(), "spread": d.verdict}),
                                 "verdict": self.comparison_verdict(d)} for other, d in self.comparisons]}


def check_claims(table: SweepTable, rows: list[RowStats], metric: str = "rsum") -> list[ClaimCheck]:
    by_label = {row.label: row.by_seed(metric) for row in rows}
    return [ClaimCheck(c, [(other, paired(f"{c.better} - {other}", by_label.get(c.better, {}),
                                          by_label.get(other, {}))) for other in c.than])
            for c in table.claims]


def render_claims(checks: list[ClaimCheck], what: str = "test RSUM") -> str:
    if not checks:
        return ""

    def comparison(other: str, diff: Optional[Difference]) -> str:
        if diff is None:
            return f"vs {other}: -"
        n = len(diff.values)
        spread = f" ± {statistics.stdev(diff.values):.1f}" if n > 1 else ""
        return (f"vs {other}: {statistics.mean(diff.values):+.1f}{spread} ({n} seed{'s' * (n > 1)}, "
                f"{ClaimCheck.comparison_verdict(diff)})")

    lines = [[c.claim.text, c.claim.source or "-", c.verdict, "; ".join(comparison(o, d) for o, d in c.comparisons)]
             for c in checks]
    return "\n".join([
        f"Claims this table tests ({what}, paired by seed: a claim holds when each of its differences clears the "
        f"spread in its favour over at least {MIN_SEEDS} seeds, and is contradicted when one clears it the other way):",
        "", markdown(["Claim", "Source", "Verdict", "Difference to each other row, points (seeds, verdict)"], lines,
                         text_columns=4)])


# ---- docs/results/summary.json: the headline numbers, written by the code that computes them -------------------


def stats(values: Sequence[float]) -> dict:
    out = {"n": len(values), "values": [round(v, 3) for v in values]}
    if values:
        out["mean"] = round(statistics.mean(values), 3)
        out["std"] = round(statistics.stdev(values), 3) if len(values) > 1 else 0.0
    return out


def summary_entry(plan: Plan, rows_by_table: dict[str, list[RowStats]], teacher: Optional[dict],
                  dataset_summary: Optional[dict] = None) -> dict:
    """One sweep's headline numbers: the teacher, then per table and row RSUM/R@1 mean, std and seeds, the row's
    % of the teacher's RSUM and the teacher's FLOPs per item over the row's (how much cheaper the student is)."""
    t_rsum = teacher["metrics"]["rsum"] if teacher else None
    t_flops = (teacher or {}).get("flops") or {}
    entry: dict = {
        "sweep": str(plan.sweep.path), "eval_split": plan.sweep.eval.split,
        "manifest_dir": plan.base.data.manifest_dir, "cache_dir": plan.teacher_cache_dir,
        "teacher": None if teacher is None else {
            "name": teacher.get("name"), "fingerprint": teacher.get("model_fingerprint"),
            "metrics": {m: round(teacher["metrics"][m], 3) for m in METRICS},
            "params": (teacher.get("params") or {}).get("total"), "flops": t_flops or None},
        "tables": {},
    }
    if entry["teacher"] is not None:  # the teacher each table's % column was computed against
        entry["teacher_of_table"] = {table_id: entry["teacher"] for table_id in rows_by_table}
    if dataset_summary:
        entry["data"] = dataset_summary
    specs = {t.id: t for t in plan.sweep.tables}
    for table_id, rows in rows_by_table.items():
        table = {}
        for r in rows:
            rsum = r.values("rsum")
            row = {"seeds_planned": r.planned, "rsum": stats(rsum), "i2t_r1": stats(r.values("i2t_r1")),
                   "t2i_r1": stats(r.values("t2i_r1")), "flops": r.flops, "errors": r.errors}
            if t_rsum and rsum:
                row["pct_of_teacher_rsum"] = stats([100.0 * v / t_rsum for v in rsum])
            if t_flops.get("total") and r.flops and r.flops.get("total"):
                row["teacher_flops_ratio"] = round(t_flops["total"] / r.flops["total"], 3)
            val = r.by_seed(VAL_RSUM)
            if val:
                row[VAL_RSUM] = stats([val[s] for s in sorted(val)])
            table[r.label] = row
        entry["tables"][table_id] = table
        extra = specs[table_id].differences if table_id in specs else ()
        # test first; then the same comparisons on val, the split runs are selected by (where records carry it)
        for metric, diffs_key, claims_key in (("rsum", "paired_differences", "claims"),
                                              (VAL_RSUM, "paired_differences_val", "claims_val")):
            diffs = row_differences(rows, metric, extra=extra)
            if diffs:
                entry.setdefault(diffs_key, {})[table_id] = [d.as_dict() for d in diffs]
            claims = check_claims(specs[table_id], rows, metric) if table_id in specs else []
            if claims and (metric == "rsum" or any(d is not None for c in claims for _, d in c.comparisons)):
                entry.setdefault(claims_key, {})[table_id] = [c.as_dict() for c in claims]
    return entry


# an entry's parts keyed by table
PER_TABLE = ("tables", "paired_differences", "paired_differences_balanced_top1", "paired_differences_val", "claims",
             "claims_val", "teacher_of_table")


def update_summary(path: Path, sweep_name: str, entry: dict, table_ids: set[str] | None = None) -> Path:
    """Update this sweep's entry in the summary file: its tables written now replace their old versions, its
    other tables (a run with --only) and the other sweeps' entries are kept. ``table_ids``: the tables the sweep
    file has now; an old entry of a table it no longer has is dropped (the summary never reports a removed table).
    ``teacher_of_table`` names the teacher each table was computed against: a kept table keeps its own when the
    sweep's ``teacher`` (the latest write's) changes, e.g. after the teacher was rebuilt."""
    import json

    data: dict = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise PipelineError(f"{path} is not valid JSON ({exc}); fix or delete it") from None
    sweeps = data.setdefault("sweeps", {})
    merged = dict(entry)
    previous = sweeps.get(sweep_name) or {}
    if previous.get("teacher") and previous.get("tables"):  # kept tables keep the teacher they were written with
        previous["teacher_of_table"] = {**{t: previous["teacher"] for t in previous["tables"]},
                                        **(previous.get("teacher_of_table") or {})}
    written = set(entry.get("tables") or {})
    for key in PER_TABLE:  # a table written now replaces every part of its old version; the others are kept
        old = {k: v for k, v in (previous.get(key) or {}).items() if k not in written}
        if table_ids is not None:
            old = {k: v for k, v in old.items() if k in table_ids}
        if key in entry or old:
            merged[key] = {**old, **(entry.get(key) or {})}
    sweeps[sweep_name] = merged
    return io.write_json(path, data)
