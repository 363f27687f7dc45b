"""Paired differences of a classification sweep (pipeline.experiments.classify_tables): the same seed on both
sides, checked against a plain reference computation, and the verdict whether a difference clears the spread."""

from __future__ import annotations

import json
import random
import statistics
from types import SimpleNamespace

import pytest

from pipeline.experiments import classify_tables as ct
from pipeline.experiments import tables
from pipeline.experiments.tables import RowStats, update_summary


def _result(rng: random.Random, gens: int, text_only: bool = False) -> dict:
    top1 = lambda: {"test": {"top1": round(rng.uniform(20, 80), 2), "top5": 90.0}}  # noqa: E731
    students = {"text": [top1() for _ in range(gens)]}
    out = {"head": top1(), "students": students}
    if not text_only:
        out["probe"] = top1()
        students["notext"] = [top1() for _ in range(gens)]
    return out


def _row(label: str, seeds: list[int], gens: int, seed: int, text_only: bool = False) -> RowStats:
    rng = random.Random(seed)
    return RowStats(label, len(seeds), [_result(rng, gens, text_only) for _ in seeds], seeds=list(seeds))


def _reference(a_row: RowStats, a_get, b_row: RowStats, b_get) -> list[float]:
    """a - b for every seed both rows finished and both values exist, ascending seed: a plain double loop."""
    out = []
    for seed in sorted(a_row.seeds):
        for s2, rb in zip(b_row.seeds, b_row.results):
            if s2 != seed:
                continue
            ra = a_row.results[a_row.seeds.index(seed)]
            try:
                out.append(a_get(ra) - b_get(rb))
            except (KeyError, IndexError):
                pass
    return out


def test_within_and_across_row_differences_pair_the_same_seed():
    ref = _row("class prompts", [2, 0, 1], gens=3, seed=1)  # results in an unsorted seed order
    other = _row("captions", [1, 2, 5], gens=1, seed=2, text_only=True)  # seed 5 has no partner, seed 0 is missing
    diffs = {d.name: d for d in ct.differences([ref, other])}

    text = lambda g: (lambda r: r["head"]["test"]["top1"] if g == 0  # noqa: E731
                      else r["students"]["text"][g - 1]["test"]["top1"])
    notext = lambda g: (lambda r: r["probe"]["test"]["top1"] if g == 0  # noqa: E731
                        else r["students"]["notext"][g - 1]["test"]["top1"])
    d = diffs["class prompts: with text - w/o text, teacher"]
    assert d.seeds == [0, 1, 2] and d.values == pytest.approx(_reference(ref, text(0), ref, notext(0)))
    d = diffs["class prompts: w/o text: gen 3 - gen 1"]
    assert d.values == pytest.approx(_reference(ref, notext(3), ref, notext(1)))
    d = diffs["captions - class prompts: with text: gen 1"]
    assert d.seeds == [1, 2] and d.values == pytest.approx(_reference(other, text(1), ref, text(1)))
    assert d.verdict == "too few seeds"
    # only pairs both sides have: the captions row has no text-free teacher and one generation
    assert "captions: with text - w/o text, teacher" not in diffs
    assert "captions - class prompts: w/o text: teacher" not in diffs
    assert "captions - class prompts: with text: gen 3" not in diffs
    assert "captions: with text: gen 1 - teacher" in diffs
    # the same model on both sides (here: the text-free teacher a captions run shares with class prompts) says so
    other.results[other.seeds.index(1)]["probe"] = ref.results[ref.seeds.index(1)]["probe"]
    other.results[other.seeds.index(2)]["probe"] = ref.results[ref.seeds.index(2)]["probe"]
    diffs = {d.name: d for d in ct.differences([ref, other])}
    assert diffs["captions - class prompts: w/o text: teacher"].verdict == "the same in every seed"


@pytest.mark.parametrize("values, verdict", [
    ([-6.7, -12.2, -9.8], "clears the spread"),  # mean -9.57, std 2.75: |mean| > 2 std
    ([-10.4, -18.2, -2.4], "inside the spread"),  # mean -10.3, std 7.9
    ([1.0, 1.0, 1.0], "clears the spread"),  # no spread at all
    ([0.0, 0.0, 0.0], "the same in every seed"),
    ([0.0, 0.0], "the same in every seed"),
    ([5.0, 6.0], "too few seeds"),
])
def test_a_difference_clears_the_spread_when_its_mean_exceeds_two_stds(values, verdict):
    d = tables.Difference("x", list(range(len(values))), values)
    assert d.verdict == verdict
    if len(values) >= tables.MIN_SEEDS and any(values):
        assert (abs(statistics.mean(values)) > 2 * statistics.stdev(values)) == (verdict == "clears the spread")


def test_the_block_lists_each_difference_with_its_per_seed_values():
    row = _row("all labels", [0, 1, 2], gens=2, seed=3)
    block = ct.render_differences(ct.differences([row]))
    d = next(x for x in ct.differences([row]) if x.name == "with text: gen 2 - gen 1")
    line = next(x for x in block.splitlines() if x.startswith("| with text: gen 2 - gen 1 |"))
    assert " / ".join(f"{v:+.1f}" for v in d.values) in line and d.verdict in line
    assert block.startswith("<details>") and block.rstrip().endswith("</details>")
    assert ct.render_differences([]) == ""


def test_a_sweep_run_with_only_one_table_keeps_the_other_tables_differences(tmp_path):
    path = tmp_path / "summary.json"
    update_summary(path, "s", {"tables": {"a": {}, "b": {}}, "paired_differences": {"a": [1], "b": [2]}}, {"a", "b"})
    update_summary(path, "s", {"tables": {"b": {"r": 1}}, "paired_differences": {"b": [3]}}, {"a", "b"})
    entry = json.loads(path.read_text())["sweeps"]["s"]
    assert entry["paired_differences"] == {"a": [1], "b": [3]} and entry["tables"] == {"a": {}, "b": {"r": 1}}
    update_summary(path, "s", {"tables": {"b": {}}, "paired_differences": {"b": [4]}}, {"b"})  # table a removed
    assert json.loads(path.read_text())["sweeps"]["s"]["paired_differences"] == {"b": [4]}


def test_a_table_written_alone_replaces_all_of_its_old_parts_and_kept_tables_keep_their_teacher(tmp_path):
    path, old_teacher, new_teacher = tmp_path / "summary.json", {"name": "t", "rsum": 423.5}, {"name": "t", "rsum": 415}
    update_summary(path, "s", {"teacher": old_teacher, "tables": {"a": {}, "b": {}},
                               "paired_differences": {"a": [1], "b": [2]}, "claims": {"b": ["holds"]}})
    # the teacher was rebuilt, then b written alone: its differences are pending now (none), its claims too
    update_summary(path, "s", {"teacher": new_teacher, "tables": {"b": {"r": 1}},
                               "teacher_of_table": {"b": new_teacher}})
    entry = json.loads(path.read_text())["sweeps"]["s"]
    assert entry["paired_differences"] == {"a": [1]} and "claims" not in entry
    assert entry["teacher"] == new_teacher
    assert entry["teacher_of_table"] == {"a": old_teacher, "b": new_teacher}


def test_balanced_top1_is_tabled_only_for_rows_whose_every_seed_measured_it():
    rng = random.Random(4)
    measured = _row("new runs", [0, 1, 2], gens=1, seed=5)
    for r in measured.results:
        for part in (r["head"], r["probe"], *r["students"]["text"], *r["students"]["notext"]):
            part["test"]["balanced_top1"] = round(rng.uniform(10, 60), 2)
    mixed = _row("older runs", [0, 1, 2], gens=1, seed=6)
    mixed.results[1]["head"]["test"]["balanced_top1"] = 50.0  # one seed re-evaluated, two not
    assert "balanced top-1" not in ct.render_tables([mixed])
    text = ct.render_tables([measured, mixed])
    block = text[text.index("Test balanced top-1"):text.index("What the first generation")]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in block.splitlines() if line.startswith("| ")}
    want = [r["head"]["test"]["balanced_top1"] for r in measured.results]
    assert f"{statistics.mean(want):.1f} ± {statistics.stdev(want):.1f}" in lines["new runs"]
    assert set(lines["older runs"].strip("| ").split(" | ")[2:]) == {"-"}  # no mean over a subset of seeds


def _with_balanced(row: RowStats, rng: random.Random, skip_seed: int | None = None) -> RowStats:
    """Add a balanced top-1 to every test part of the row's results, except in the run of ``skip_seed``."""
    for seed, r in zip(row.seeds, row.results):
        if seed == skip_seed:
            continue
        parts = [r["head"], r.get("probe"), *(s for kind in r["students"].values() for s in kind)]
        for p in filter(None, parts):
            p["test"]["balanced_top1"] = round(rng.uniform(10, 60), 2)
    return row


def test_balanced_top1_gets_its_own_block_only_where_every_seed_measured_it():
    from pipeline.experiments.sweep import SweepTable

    rng = random.Random(7)
    ref = _with_balanced(_row("out-of-fold", [0, 1, 2], gens=2, seed=4), rng)
    other = _with_balanced(_row("in-sample", [2, 1, 0], gens=1, seed=5), rng)
    table = SweepTable("targets", "Table X", "", (0, 1, 2), ())
    text = ct.section(table, [ref, other], "cmd", "wall")
    assert "Paired differences of test top-1" in text and "Paired differences of test balanced top-1" in text
    block = text[text.index("Paired differences of test balanced top-1"):]
    d = next(x for x in ct.differences([ref, other], "balanced_top1")
             if x.name == "in-sample - out-of-fold: w/o text: gen 1")
    bal = lambda r: r["students"]["notext"][0]["test"]["balanced_top1"]  # noqa: E731
    assert d.values == pytest.approx(_reference(other, bal, ref, bal))
    line = next(x for x in block.splitlines() if x.startswith("| in-sample - out-of-fold: w/o text: gen 1 |"))
    assert " / ".join(f"{v:+.1f}" for v in d.values) in line
    # one run from before balanced top-1 was measured: that row's balanced differences are left out, not averaged
    # over the other seeds
    partial = _with_balanced(_row("in-sample", [0, 1, 2], gens=1, seed=5), rng, skip_seed=1)
    names = {x.name for x in ct.differences([ref, partial], "balanced_top1")}
    assert names and not any(n.startswith("in-sample") for n in names)
    assert "balanced top-1" not in ct.section(table, [_row("a", [0, 1, 2], gens=1, seed=6)], "cmd", "wall")
    for r in ref.results + other.results:
        r["classes"] = ["a", "b"]
    plan = SimpleNamespace(sweep=SimpleNamespace(path="s.yaml"),
                           base=SimpleNamespace(data=SimpleNamespace(manifest_dir="m"), teacher="t"))
    entry = ct.summary_entry(plan, {"targets": [ref, other]})
    assert [x["name"] for x in entry["paired_differences_balanced_top1"]["targets"]] == [
        x.name for x in ct.differences([ref, other], "balanced_top1")]


def test_the_targets_balanced_top1_is_tabled_only_over_seeds_that_all_measured_it():
    row = _row("in-sample", [0, 1, 2], gens=1, seed=8)
    for i, r in enumerate(row.results):
        for part in ("head", "probe"):
            r[part]["targets"] = {"train": {"top1": 90.0 + i, **({"balanced_top1": 50.0 + 2 * i} if i else {})}}
    assert ct.target_values(row, "probe", "balanced_top1") == [] and ct.target_values(row, "probe") == [90, 91, 92]
    assert "train balanced top-1" not in ct.render_tables([row])
    row.results[0]["probe"]["targets"]["train"]["balanced_top1"] = 50.0
    row.results[0]["head"]["targets"]["train"]["balanced_top1"] = 50.0
    text = ct.render_tables([row])
    header = next(x for x in text.splitlines() if "train balanced top-1" in x)
    cells = next(x for x in text.splitlines() if x.startswith("| in-sample |") and "91.0 ± 1.0" in x)
    col = [c.strip() for c in header.split("|")].index("targets w/o text: train balanced top-1")
    assert [c.strip() for c in cells.split("|")][col] == "52.0 ± 2.0"


def test_retrieval_tables_list_each_row_minus_the_first_seed_by_seed(tmp_path):
    """A retrieval table's rows against its first row, matched by seed (not by position), in the block and in
    summary.json; a row that shares fewer than two seeds with the first gives no line."""
    def row(label, by_seed):
        return RowStats(label, 3, results=[{"metrics": {m: v for m in tables.METRICS}} for v in by_seed.values()],
                        seeds=list(by_seed))

    base = row("pairs", {0: 150.0, 1: 154.0, 2: 149.0})
    better = row("distilled", {2: 180.0, 0: 176.0, 1: 181.0})  # finished in another order
    lone = row("one seed", {0: 160.0})
    diffs = tables.row_differences([base, better, lone])
    assert [d.name for d in diffs] == ["distilled - pairs"]
    assert diffs[0].seeds == [0, 1, 2] and diffs[0].values == [26.0, 27.0, 31.0]
    assert diffs[0].verdict == "clears the spread"
    block = tables.render_differences(diffs)
    assert "| distilled - pairs | 3 | +26.0 / +27.0 / +31.0 | 28.0 ± 2.6 | clears the spread |" in block
    plan = SimpleNamespace(sweep=SimpleNamespace(path="s.yaml", eval=SimpleNamespace(split="test"), tables=()),
                           base=SimpleNamespace(data=SimpleNamespace(manifest_dir="m")), teacher_cache_dir="c")
    entry = tables.summary_entry(plan, {"t": [base, better, lone]}, None)
    assert entry["paired_differences"]["t"][0]["values"] == [26.0, 27.0, 31.0]
    assert entry["paired_differences"]["t"][0]["verdict"] == "clears the spread"
