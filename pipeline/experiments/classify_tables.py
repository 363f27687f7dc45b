"""Tables of a classification sweep (``command: classify``; each run is a pipeline.classify.experiment run).

Per row and column, mean ± sample std over the row's seeds of the test top-1 and top-5 (%) of the text-free
teacher (linear probe), the teacher with text (representation head) and each student generation learning from
them; then what the first generation learns from (the soft targets' top-1 on the training images: out-of-fold or
in-sample) and, where the runs report it, image-text retrieval RSUM of the teacher and of each student. Then the
paired differences the findings rest on (the same seed on both sides): text against no text, a generation against
its teacher and against generation 1, and every row against the table's first row, each with the verdict whether
it clears the seeds' spread. The blocks go between the same markers and into the same summary file as retrieval
tables (pipeline.experiments.tables).
"""

from __future__ import annotations

from typing import Optional

from pipeline.experiments import tables
from pipeline.experiments.sweep import Plan, SweepTable
from pipeline.experiments.tables import Difference, RowStats, mean_std, paired, render_differences

# (student kind, its teacher part in results.json, label)
KINDS = (("notext", "probe", "w/o text"), ("text", "head", "with text"))


def generations(rows: list[RowStats]) -> int:
    return max([len(r.get("students", {}).get(kind, [])) for row in rows for r in row.results
                for kind, _, _ in KINDS] + [0])


def _part(result: dict, kind: str, part: str, g: int) -> Optional[dict]:
    """Generation ``g`` of ``kind``'s students, or (g = 0) their teacher."""
    if g == 0:
        return result.get(part)
    students = result.get("students", {}).get(kind, [])
    return students[g - 1] if g <= len(students) else None


def by_seed(row: RowStats, kind: str, part: str, g: int, metric: str = "top1") -> dict[int, float]:
    """One column's test ``metric`` per finished seed (in the row's order); empty when some seed lacks the metric."""
    tests = {seed: p["test"] for seed, r in zip(row.seeds, row.results)
             if (p := _part(r, kind, part, g)) and p.get("test")}
    return {s: float(t[metric]) for s, t in tests.items()} if all(metric in t for t in tests.values()) else {}


def values(row: RowStats, kind: str, part: str, g: int, metric: str) -> list[float]:
    """Test ``metric`` (top1, top5, balanced_top1) of one column over the row's finished seeds; none when some
    seed lacks the metric (runs from before it was measured): a mean over a subset of seeds would mislead."""
    return list(by_seed(row, kind, part, g, metric).values())


def retrieval_values(row: RowStats, kind: str, g: int) -> list[float]:
    """Test RSUM of image-text retrieval: the teacher's (g = 0, the same for both kinds) or a student's."""
    out = []
    for r in row.results:
        p = r.get("teacher_retrieval") if g == 0 else (_part(r, kind, "", g) or {}).get("retrieval")
        if p:
            out.append(float(p["rsum"]))
    return out


def target_values(row: RowStats, part: str, metric: str = "top1") -> list[float]:
    """The ``metric`` of ``part``'s soft targets on the training images, per seed; none when a seed lacks it."""
    found = [r[part]["targets"]["train"] for r in row.results if (r.get(part) or {}).get("targets")]
    return [float(t[metric]) for t in found] if all(metric in t for t in found) else []


METRIC_NAMES = {"top1": "top-1", "top5": "top-5", "balanced_top1": "balanced top-1"}


def _gen_name(g: int) -> str:
    return "teacher" if g == 0 else f"gen {g}"


def _columns(gens: int) -> list[tuple[str, str, int, str]]:
    return [(kind, part, g, f"{label}: {_gen_name(g)}")
            for kind, part, label in KINDS for g in range(gens + 1)]


def render_tables(rows: list[RowStats]) -> str:
    """Top-1 table (with the majority class), top-5, balanced top-1 where measured, then soft targets and retrieval."""
    gens = generations(rows)
    cols = _columns(gens)
    out = []
    metrics = [("top1", "Test top-1 (%)"), ("top5", "Test top-5 (%)")]
    if any(values(row, kind, part, g, "balanced_top1") for row in rows for kind, part, g, _ in cols):
        metrics.append(("balanced_top1", "Test balanced top-1 (%: each class's top-1, averaged over the classes)"))
    for metric, title in metrics:
        header = ["Row", "Seeds", *(["majority class"] if metric == "top1" else []), *(c[3] for c in cols)]
        lines = []
        for row in rows:
            line = [row.label, tables.seeds_cell(row)]
            if metric == "top1":
                majority = [r["majority_class"]["test_top1"] for r in row.results
                            if "test_top1" in r.get("majority_class", {})]
                line.append(mean_std(majority))
            line += [mean_std(values(row, kind, part, g, metric)) for kind, part, g, _ in cols]
            lines.append(line)
        out += [f"{title}:", "", tables.markdown(header, lines), ""]
    # retrieval columns only where some run measured it (retrieval: true and a test split with captions)
    retrieval = [c for c in cols if any(retrieval_values(row, c[0], c[2]) for row in rows)]
    # balanced top-1 of the targets shows whether their errors fall on the rare classes (Table C4)
    target_metrics = ["top1"] + (["balanced_top1"] if any(target_values(row, part, "balanced_top1")
                                                          for row in rows for _, part, _ in KINDS) else [])
    header = ["Row", *(f"targets {label}: train {METRIC_NAMES[metric]}" for metric in target_metrics
                       for _, _, label in KINDS),
              *(f"{'teacher' if c[2] == 0 else c[3]}: retrieval RSUM" for c in retrieval if c[0] == "text" or c[2])]
    lines = []
    for row in rows:
        line = [row.label, *(mean_std(target_values(row, part, metric))
                             for metric in target_metrics for _, part, _ in KINDS)]
        line += [mean_std(retrieval_values(row, kind, g)) for kind, _, g, _ in retrieval if kind == "text" or g]
        lines.append(line)
    measured = " and balanced top-1" if len(target_metrics) > 1 else ""
    out += [f"What the first generation learns from (top-1{measured} of the teachers' soft targets on the training "
            "images)" + (" and image-text retrieval (test RSUM):" if retrieval else ":"),
            "", tables.markdown(header, lines)]
    return "\n".join(out)


# ---- paired differences ------------------------------------------------------------------------------------------
# the metrics whose paired differences are listed, and their summary.json keys; balanced top-1 too, because a
# change can trade the frequent classes for the rare ones with top-1 unmoved (Table C4)
DIFF_METRICS = (("top1", "paired_differences"), ("balanced_top1", "paired_differences_balanced_top1"))


def differences(rows: list[RowStats], metric: str = "top1") -> list[Difference]:
    """Within each row: with text - without (teacher, gen 1, last gen), gen 1 - its teacher, last gen - gen 1 (per
    kind). Across rows: each row - the first row, column by column. Only pairs that both sides have."""
    gens = generations(rows)
    last = [1, gens] if gens > 1 else [1]
    out: list[Optional[Difference]] = []
    for row in rows:
        prefix = f"{row.label}: " if len(rows) > 1 else ""
        col = lambda kind, part, g: by_seed(row, kind, part, g, metric)  # noqa: E731
        for g in [0, *last] if gens else [0]:
            out.append(paired(f"{prefix}with text - w/o text, {_gen_name(g)}",
                              col("text", "head", g), col("notext", "probe", g)))
        for kind, part, label in KINDS:
            out.append(paired(f"{prefix}{label}: gen 1 - teacher", col(kind, part, 1), col(kind, part, 0)))
            if gens > 1:
                out.append(paired(f"{prefix}{label}: gen {gens} - gen 1", col(kind, part, gens), col(kind, part, 1)))
    for row in rows[1:]:
        for kind, part, g, name in _columns(gens):
            out.append(paired(f"{row.label} - {rows[0].label}: {name}",
                              by_seed(row, kind, part, g, metric), by_seed(rows[0], kind, part, g, metric)))
    return [d for d in out if d is not None]


def section(table: SweepTable, rows: list[RowStats], command: str, wall: str) -> str:
    """The marker-delimited block of one classification table."""
    parts = [tables.start_marker(table.id), f"### {table.title}", ""]
    if table.description:
        parts += [table.description.strip(), ""]
    blocks = [b for metric, _ in DIFF_METRICS
              if (b := render_differences(differences(rows, metric), f"test {METRIC_NAMES[metric]}"))]
    parts += [render_tables(rows), "", *(x for b in blocks for x in (b, "")), tables.seeds_note(table, rows),
              *tables.errors_note(rows), "", wall, "",
              f"Regenerate: `{command}`", tables.end_marker(table.id)]
    return "\n".join(parts)


def _column_stats(row: RowStats, gens: int) -> dict:
    out = {}
    for kind, part, g, name in _columns(gens):
        out[name] = {m: tables.stats(values(row, kind, part, g, m)) for m in ("top1", "top5", "balanced_top1")}
        rsum = retrieval_values(row, kind, g)
        if rsum:
            out[name]["retrieval_rsum"] = tables.stats(rsum)
    return out


def summary_entry(plan: Plan, rows_by_table: dict[str, list[RowStats]]) -> dict:
    """One classification sweep's headline numbers: per table and row, each column's test top-1 / top-5 (and
    retrieval RSUM) mean, std and seeds, the majority-class baseline and the soft targets' training top-1."""
    entry: dict = {"sweep": str(plan.sweep.path), "command": "classify", "eval_split": "test",
                   "manifest_dir": plan.base.data.manifest_dir, "teacher": plan.base.teacher, "tables": {}}
    for table_id, rows in rows_by_table.items():
        gens = generations(rows)
        entry["tables"][table_id] = {
            r.label: {"seeds_planned": r.planned, "errors": r.errors,
                      "classes": len(r.results[0]["classes"]) if r.results else None,
                      "majority_class_top1": tables.stats([x["majority_class"]["test_top1"] for x in r.results
                                                           if "test_top1" in x.get("majority_class", {})]),
                      "targets_train_top1": {part: tables.stats(target_values(r, part)) for _, part, _ in KINDS},
                      "targets_train_balanced_top1": {part: tables.stats(target_values(r, part, "balanced_top1"))
                                                      for _, part, _ in KINDS},
                      "columns": _column_stats(r, gens)}
            for r in rows}
        for metric, key in DIFF_METRICS:
            entry.setdefault(key, {})[table_id] = [d.as_dict() for d in differences(rows, metric)]
    return entry


__all__ = ["render_tables", "section", "summary_entry", "values", "retrieval_values", "target_values",
           "differences", "by_seed", "DIFF_METRICS"]
