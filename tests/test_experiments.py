"""Experiment runner through the real CLI (sweeps/tiny.yaml on a generated cache): deduplication across
tables, tables with per-seed aggregates checked against the runs' own results, failures recorded while the
other runs finish, reruns that skip finished work, and hand-written text kept around regenerated tables."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import typer
from typer.testing import CliRunner

from pipeline.common import config as cfgio
from pipeline.common.errors import PipelineError
from pipeline.common.runlog import read_metrics
from pipeline.retrieval.evaluate import RESULT_FORMAT
from pipeline.experiments.tables import end_marker, mean_std, row_stats, start_marker, update_document
from pipeline.experiments.sweep import load_sweep, override_strings, plan_sweep, run_key
from pipeline.distill.trainer import DistillConfig
from stages.experiments import experiments
from tests.gen_cache import make_cache, make_dataset

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "tiny.yaml"
METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")

app = typer.Typer()
app.command("experiments")(experiments)
app.command("unused")(lambda: None)  # two commands, so the runner takes the command name as with clipdistill


def cli(*args) -> SimpleNamespace:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, PipelineError):
        raise result.exception
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    manifests = make_dataset(root)
    return SimpleNamespace(root=root, manifests=manifests, cache=make_cache(manifests, root / "cache"))


def sweep_args(data, *extra) -> list:
    return ["experiments", "--sweep", SWEEP, "--runs-dir", data.root / "runs", "--results",
            data.root / "docs" / "RESULTS.md", "--set", f"data.manifest_dir={data.manifests}",
            "--set", f"data.cache_dir={data.cache}", *extra]


@pytest.fixture(scope="module")
def swept(data):
    """The tiny sweep run once, three training processes at a time."""
    mp = pytest.MonkeyPatch()
    mp.chdir(ROOT)  # the sweep's base config path is relative to the repo root
    mp.setenv("OMP_NUM_THREADS", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        result = cli(*sweep_args(data, "--jobs", 3))
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    runs = data.root / "runs"
    records = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/experiment.json")}
    return SimpleNamespace(output=result.output, runs=runs, records=records,
                           doc=data.root / "docs" / "RESULTS.md")


def table_rows(doc: str, table_id: str) -> dict[str, list[str]]:
    """{first cell: cells} of the (first) Markdown table inside one marked section."""
    block = doc[doc.index(start_marker(table_id)):doc.index(end_marker(table_id))]
    lines = list(itertools.takewhile(lambda ln: ln.startswith("| "),
                                     itertools.dropwhile(lambda ln: not ln.startswith("| "), block.splitlines())))
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


# ---- end to end --------------------------------------------------------------------------------------


def test_shared_row_trains_once_and_failures_are_recorded(swept):
    # methods: 2 seeds; ablation: the same config as methods seed 0, an invalid row, a row failing in distill.
    assert "5 cells (1 invalid) -> 3 unique runs (1 deduplicated)" in swept.output
    assert swept.output.count("] train ") == 3
    status = sorted(r["status"] for r in swept.records.values())
    assert status == ["done", "done", "failed"]
    failed = next(r for r in swept.records.values() if r["status"] == "failed")
    assert "batch size 100000" in failed["error"] and failed["uses"] == [
        {"table": "ablation", "label": "batch too big", "seed": 0}]
    shared = [r for r in swept.records.values() if len(r["uses"]) == 2]
    assert len(shared) == 1 and {u["table"] for u in shared[0]["uses"]} == {"methods", "ablation"}
    for r in swept.records.values():  # wall-clock and device recorded per run
        assert r["train_seconds"] > 0 and r["device"].startswith("cpu") and r["host"]
        if r["status"] == "done":
            assert r["eval_seconds"] > 0 and r["flops"]["total"] > 0
            assert (swept.runs / r["name"] / "export" / "student.pt").is_file()
            # the trainer ran the config the runner planned (pairs-only loss, the seed of the cell)
            cfg = json.loads((swept.runs / r["name"] / "config.json").read_text())
            assert cfg["seed"] == r["uses"][0]["seed"] and cfg["losses"]["pair"] and not cfg["losses"]["cd"]


def test_results_tables_match_the_runs(swept):
    doc = swept.doc.read_text()
    methods, ablation = table_rows(doc, "methods"), table_rows(doc, "ablation")
    assert list(methods) == ["teacher (teacher-fake)", "no distillation"]
    assert list(ablation) == ["pairs only", "typo", "batch too big"]
    assert methods["no distillation"]["Seeds"] == "2" and ablation["pairs only"]["Seeds"] == "1"
    assert ablation["typo"]["Seeds"] == ablation["batch too big"]["Seeds"] == "0 of 1"
    assert "GFLOPs img / txt" in methods["no distillation"]  # cost columns only where the table asks
    assert "GFLOPs img / txt" not in ablation["pairs only"]
    # Aggregates recomputed from the two runs' own stage-3 results.
    by_seed = {}
    for r in swept.records.values():
        if r["status"] == "done":
            res = json.loads((swept.runs / r["name"] / "eval" / "result.json").read_text())
            by_seed[r["uses"][0]["seed"]] = res
    teacher = json.loads(next((swept.runs / "_teacher").glob("*/result.json")).read_text())
    labels = ("i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "RSUM")
    for metric, label in zip(METRICS, labels):
        values = [by_seed[s]["metrics"][metric] for s in (0, 1)]
        expect = f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
        assert methods["no distillation"][label] == expect, label
        assert ablation["pairs only"][label] == f"{by_seed[0]['metrics'][metric]:.1f}"
        assert methods["teacher (teacher-fake)"][label] == f"{teacher['metrics'][metric]:.1f}"
    pct = [100 * by_seed[s]["metrics"]["rsum"] / teacher["metrics"]["rsum"] for s in (0, 1)]
    assert methods["no distillation"]["% of teacher RSUM"] == mean_std(pct) + "%"
    # failures listed with their reasons, wall-clock, the regenerating command and the figure
    assert "typo, seed 0: invalid config" in doc and "unknown key 'losses.nope'" in doc
    assert "batch too big, seed 0" in doc and "batch size 100000" in doc
    assert "Wall-clock:" in doc and "--only methods" in doc and "--only ablation" in doc
    assert (swept.doc.parent / "results" / "tiny-methods.png").stat().st_size > 0
    # the headline numbers in summary.json are the same aggregates, computed from the same results
    summary = json.loads((swept.doc.parent / "results" / "summary.json").read_text())["sweeps"]["tiny"]
    assert summary["teacher"]["metrics"]["rsum"] == round(teacher["metrics"]["rsum"], 3)
    row = summary["tables"]["methods"]["no distillation"]
    rsums = [by_seed[s]["metrics"]["rsum"] for s in (0, 1)]
    assert row["rsum"]["n"] == 2 and row["rsum"]["mean"] == round(statistics.mean(rsums), 3)
    assert row["rsum"]["std"] == round(statistics.stdev(rsums), 3)
    assert row["pct_of_teacher_rsum"]["mean"] == round(statistics.mean(pct), 3)
    assert summary["tables"]["ablation"]["batch too big"]["rsum"]["n"] == 0
    assert "batch size 100000" in summary["tables"]["ablation"]["batch too big"]["errors"][0]
    # the table's claim: listed with its verdict under the table and in summary.json
    (claim,) = summary["claims"]["ablation"]
    assert (claim["better"], claim["than"], claim["verdict"]) == ("pairs only", ["batch too big"], "pending")
    assert "| Training on the pairs beats a batch too big | tests | pending | vs batch too big: - |" in doc
    assert "claims: 1 pending" in swept.output  # and counted at the end of the run


def test_rerun_skips_finished_runs_and_keeps_hand_written_text(swept, data, monkeypatch):
    doc = swept.doc.read_text()
    edited = ("Intro written by hand.\n" + doc.replace(end_marker("methods"), end_marker("methods")
                                                       + "\n\nComment between tables.", 1)
              .replace("Mean ± sample std", "STALE TEXT INSIDE", 1) + "\nClosing note.\n")
    swept.doc.write_text(edited)
    done = [r["name"] for r in swept.records.values() if r["status"] == "done"]
    stamps = {n: [(swept.runs / n / f).stat().st_mtime_ns for f in ("export/student.pt", "eval/result.json")]
              for n in done}
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # --skip-failed keeps the failed run's recorded error (by default it would be tried again).
    result = cli(*sweep_args(data, "--skip-failed"))
    assert result.exit_code == 0, result.output
    assert "2 of 3 runs already trained: skipped" in result.output
    assert "1 run(s) that failed before not tried again" in result.output
    assert "2 of 2 trained runs already evaluated: skipped" in result.output
    assert "] train " not in result.output and "teacher teacher-fake" not in result.output
    for n in done:
        assert [(swept.runs / n / f).stat().st_mtime_ns for f in ("export/student.pt", "eval/result.json")] \
            == stamps[n]
    new = swept.doc.read_text()
    assert new.startswith("Intro written by hand.\n") and new.endswith("Closing note.\n")
    assert "Comment between tables." in new and "STALE TEXT INSIDE" not in new
    assert new.count(start_marker("methods")) == 1 and new.count(start_marker("ablation")) == 1
    assert table_rows(new, "methods") == table_rows(doc, "methods")
    assert table_rows(new, "ablation") == table_rows(doc, "ablation") and "batch size 100000" in new


def test_prune_deletes_only_finished_runs_checkpoints(swept, data, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    shutil.copytree(swept.runs, runs)  # a copy: the module's other tests keep their checkpoints
    done = sorted(r["name"] for r in swept.records.values() if r["status"] == "done")
    finished, unevaluated = done
    # retrained since its evaluation (export newer than the result): not finished, it may still need a resume
    later = (runs / unevaluated / "eval" / "result.json").stat().st_mtime + 60
    os.utime(runs / unevaluated / "export" / "student.pt", (later, later))
    assert (runs / finished / "checkpoints").is_dir() and (runs / unevaluated / "checkpoints").is_dir()
    size = sum(f.stat().st_size for f in (runs / finished / "checkpoints").rglob("*") if f.is_file())
    monkeypatch.chdir(ROOT)
    args = sweep_args(data, "--tables-only", "--prune-checkpoints")
    args[args.index("--runs-dir") + 1] = runs
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert f"pruned the checkpoints of 1 finished run(s): {size / 2**30:.2f} GiB freed" in result.output
    assert not (runs / finished / "checkpoints").exists()
    assert (runs / finished / "export" / "student.pt").is_file() and (runs / finished / "eval" / "result.json").is_file()
    assert json.loads((runs / finished / "experiment.json").read_text())["checkpoints_pruned"] is True
    assert (runs / unevaluated / "checkpoints" / "last.pt").is_file()
    assert "checkpoints_pruned" not in json.loads((runs / unevaluated / "experiment.json").read_text())


def test_an_archive_keeps_finished_results_and_a_fresh_runs_folder_restores_them_without_training(
        swept, data, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    archive, runs = tmp_path / "archive", tmp_path / "runs"
    shutil.copytree(swept.runs, runs)
    args = sweep_args(data, "--tables-only", "--no-figures", "--archive", archive)
    args[args.index("--runs-dir") + 1] = runs
    result = cli(*args)
    assert result.exit_code == 0, result.output
    done = sorted(r["name"] for r in swept.records.values() if r["status"] == "done")
    assert "archived the results of 2 run(s)" in result.output
    assert sorted(p.name for p in archive.iterdir()) == done  # the failed run is not archived
    for name in done:  # the record (with the full run key) and the stage-3 result, nothing heavy
        assert sorted(str(p.relative_to(archive / name)) for p in (archive / name).rglob("*") if p.is_file()) \
            == ["eval/result.json", "experiment.json"]
        assert json.loads((archive / name / "experiment.json").read_text())["key"].startswith(name[1:])
        assert (archive / name / "eval" / "result.json").read_bytes() == \
            (swept.runs / name / "eval" / "result.json").read_bytes()
        # the best-epoch val RSUM travels in the record: the metrics log stays behind
        val = [r["rsum"] for r in read_metrics(swept.runs / name, "val")]
        assert val and json.loads((archive / name / "experiment.json").read_text())["best_val_rsum"] == \
            round(max(val), 3)
    # another machine: no runs folder, the archive only; the methods table is rebuilt without training
    fresh, doc = tmp_path / "fresh", tmp_path / "R.md"
    args = sweep_args(data, "--only", "methods", "--no-figures", "--archive", archive)
    args[args.index("--runs-dir") + 1], args[args.index("--results") + 1] = fresh, doc
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "restored the results of 2 finished run(s)" in result.output and "] train " not in result.output
    assert "2 of 2 trained runs already evaluated: skipped" in result.output
    assert "archived the results" not in result.output  # restored runs are already there
    assert table_rows(doc.read_text(), "methods") == table_rows(swept.doc.read_text(), "methods")
    row = json.loads((tmp_path / "results" / "summary.json").read_text())["sweeps"]["tiny"]["tables"]["methods"]
    assert row["no distillation"]["best_val_rsum"]["n"] == 2  # restored runs still compare on val
    for name in done:
        assert json.loads((fresh / name / "experiment.json").read_text())["results_from"] == str(archive)
        assert not (fresh / name / "export").exists()
    # a result measured under another teacher cache is not restored: that run trains again (not here: --no-train)
    name = done[0]
    result_file = archive / name / "eval" / "result.json"
    original = result_file.read_text()
    stored = json.loads(original)
    result_file.write_text(json.dumps({**stored, "settings": {**stored["settings"], "teacher_cache": "other"}}))
    args[args.index("--runs-dir") + 1] = tmp_path / "fresh1"
    result = cli(*args, "--no-train")
    assert result.exit_code == 0, result.output
    assert "restored the results of 1 finished run(s)" in result.output
    assert f"1 archived run(s) measured with another teacher cache, manifest or split: not restored " \
           f"(they train again): {name}" in result.output
    assert table_rows(doc.read_text(), "methods")["no distillation"]["Seeds"] == "1 of 2"
    result_file.write_text(original)
    # an entry whose key is not the planned run's is refused, not used
    record = json.loads((archive / name / "experiment.json").read_text())
    (archive / name / "experiment.json").write_text(json.dumps({**record, "key": "f" * 64}))
    args[args.index("--runs-dir") + 1] = tmp_path / "fresh2"
    bad = cli(*args)
    assert bad.exit_code != 0 and "archived for run key ffffffffffffffff" in str(bad.exception)


def test_a_teacher_only_table_trains_nothing_and_reports_the_teacher(data, tmp_path, monkeypatch):
    sweep = tmp_path / "teacher.yaml"
    sweep.write_text((SWEEP.read_text().split("tables:")[0]) + (
        "tables:\n  - id: zero-shot\n    title: Teacher alone\n    teacher: true\n"))
    monkeypatch.chdir(ROOT)
    result = cli("experiments", "--sweep", sweep, "--runs-dir", tmp_path / "runs", "--results", tmp_path / "R.md",
                 "--set", f"data.manifest_dir={data.manifests}", "--set", f"data.cache_dir={data.cache}")
    assert result.exit_code == 0, result.output
    assert list(table_rows((tmp_path / "R.md").read_text(), "zero-shot")) == ["teacher (teacher-fake)"]
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())["sweeps"]["tiny"]
    assert summary["teacher"]["metrics"]["rsum"] > 0 and summary["tables"]["zero-shot"] == {}
    # a later run of another table (--only) keeps this table's entry
    from pipeline.experiments.tables import update_summary

    update_summary(tmp_path / "results" / "summary.json", "tiny", {**summary, "tables": {"other": {}}})
    kept = json.loads((tmp_path / "results" / "summary.json").read_text())["sweeps"]["tiny"]["tables"]
    assert set(kept) == {"zero-shot", "other"}
    # a table the sweep file no longer has leaves the summary
    update_summary(tmp_path / "results" / "summary.json", "tiny", {**summary, "tables": {"other": {}}},
                   table_ids={"other"})
    kept = json.loads((tmp_path / "results" / "summary.json").read_text())["sweeps"]["tiny"]["tables"]
    assert set(kept) == {"other"}
    no_teacher = tmp_path / "none.yaml"
    no_teacher.write_text(SWEEP.read_text().split("tables:")[0] + "tables:\n  - id: empty\n")
    bad = cli("experiments", "--sweep", no_teacher, "--dry-run")
    assert bad.exit_code != 0 and "no rows (and no teacher: true)" in str(bad.exception)


def test_no_train_evaluates_what_is_trained_and_shows_the_rest_unfinished(data, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = cli("experiments", "--sweep", SWEEP, "--runs-dir", tmp_path / "runs", "--results", tmp_path / "R.md",
                 "--only", "methods", "--no-train", "--no-figures",
                 "--set", f"data.manifest_dir={data.manifests}", "--set", f"data.cache_dir={data.cache}")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["_teacher"]  # no run folder: nothing trained
    rows = table_rows((tmp_path / "R.md").read_text(), "methods")
    assert rows["no distillation"]["Seeds"] == "0 of 2" and rows["teacher (teacher-fake)"]["RSUM"]
    assert "2 run(s) not finished yet" in (tmp_path / "R.md").read_text()


# ---- planning and documents, no training -------------------------------------------------------------


def test_dry_run_prints_plan_and_trains_nothing(data, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = cli("experiments", "--sweep", SWEEP, "--runs-dir", tmp_path / "runs", "--results",
                 tmp_path / "R.md", "--dry-run", "--only", "ablation")
    assert result.exit_code == 0, result.output
    assert "table methods" not in result.output and "typo / seed 0: INVALID" in result.output
    assert "3 cells (1 invalid) -> 2 unique runs (0 deduplicated); 0 done" in result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "R.md").exists()


def test_every_sweep_command_has_a_registered_adapter_and_another_is_one_clear_error():
    import importlib

    from pipeline.experiments.adapters import ADAPTERS, CommandAdapter, adapter
    from pipeline.experiments.sweep import COMMANDS

    assert set(ADAPTERS) == set(COMMANDS)
    for command in COMMANDS:
        runs = adapter(command)
        module, _, name = runs.trainer.partition(":")  # a library function, not the command line
        assert isinstance(runs, CommandAdapter) and callable(getattr(importlib.import_module(module), name))
        assert not module.startswith("stages")
    with pytest.raises(PipelineError) as err:
        adapter("train")
    assert "no adapter for command 'train'" in str(err.value) and "distill, adapt" in str(err.value)
    assert "\n" not in str(err.value)


def test_run_key_ignores_bookkeeping_only():
    def key(*sets):
        return run_key(cfgio.load(DistillConfig, None, list(sets)))

    base = key()
    assert key("name=other", "runs_dir=elsewhere", "device=cuda", "data.workers=7", "log_every=3") == base
    assert key("seed=1") != base and key("losses.tau=0.1") != base and key("queue.size=4096") != base
    assert key("losses.cd=true") == base  # an override equal to the default is the same run
    # threads change the sums' order, hence the weights: a run of its own (the default keeps older runs' keys)
    assert key("threads=1") != base and key("threads=0") == base


def test_override_strings_round_trip():
    sets = {"losses.tau": 0.1, "losses.cd": False, "optim.decay_epochs": [3, 5], "queue.mode": "random",
            "balancer.weights": {"fd": 2.0}, "student": "tiny", "balancer.window_steps": None}
    cfg = cfgio.load(DistillConfig, None, override_strings(sets))
    assert (cfg.losses.tau, cfg.losses.cd, cfg.optim.decay_epochs) == (0.1, False, (3, 5))
    assert (cfg.queue.mode, cfg.balancer.weights, cfg.student) == ("random", {"fd": 2.0}, "tiny")
    assert cfg.balancer.window_steps is None


def test_plan_counts_cells_and_rejects_unknown_table(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(ROOT / "sweeps" / "openmoji.yaml")
    plan = plan_sweep(sweep, tmp_path)
    assert len(plan.table_cells("losses")) == 15 and len(plan.table_cells("main")) == 3
    assert not [c for c in plan.cells if c.error]
    # the default student's seed-0 run is shared by every table that has a default row
    default = plan.table_cells("main")[0].key
    assert {c.table for c in plan.runs[default].cells} == {t.id for t in sweep.tables}
    with pytest.raises(PipelineError, match="no table 'nope'"):
        plan_sweep(sweep, tmp_path, only=["nope"])


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "sweeps").glob("*.yaml") if p.name != "tiny.yaml"),
                         ids=lambda p: p.name)  # tiny.yaml is the tests' own sweep, with a typo on purpose
def test_every_shipped_sweep_plans_without_invalid_cells(path, tmp_path, monkeypatch):
    """A typo in a shipped sweep (a row's override, a student override) fails here, not hours into a sweep."""
    from pipeline.distill.trainer import student_config

    monkeypatch.chdir(ROOT)
    plan = plan_sweep(load_sweep(path), tmp_path)
    assert not [(c.table, c.label, c.error) for c in plan.cells if c.error]
    for run in plan.runs.values():
        if isinstance(run.config, DistillConfig):
            student_config(run.config, 512)  # the student overrides resolve (unknown keys are a PipelineError)
    sweep = load_sweep(path)
    if sweep.archive is not None and sweep.archive.is_dir():  # every archived run is one this sweep plans
        planned = {run.name: key for key, run in plan.runs.items()}
        for entry in sorted(sweep.archive.iterdir()):
            record = json.loads((entry / "experiment.json").read_text())
            assert planned.get(entry.name) == record["key"], f"{entry}: not a run of {path.name}"
            assert record["status"] == "done" and (entry / "eval" / "result.json").is_file()


def test_row_stats_counts_each_run_once(tmp_path, monkeypatch):
    """Seeds collapsed into one run by a global override are one result, not three copies of it."""
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(SWEEP)
    plan = plan_sweep(sweep, tmp_path, ["seed=0"], only=["methods"])
    (key,) = plan.runs
    (plan.eval_dir(key)).mkdir(parents=True)
    metrics = {m: 10.0 for m in METRICS}
    (plan.eval_dir(key) / "result.json").write_text(json.dumps({"format": RESULT_FORMAT, "metrics": metrics}))
    (stats,) = row_stats(plan, sweep.table("methods"), {key: {"status": "done"}})
    assert (stats.planned, len(stats.results), stats.values("rsum")) == (1, 1, [10.0])


@pytest.mark.parametrize("body, fragment", [
    ("tables: []", "non-empty list"),
    ("tables:\n  - {id: a, rows: [{label: x}]}\n  - {id: a, rows: [{label: y}]}", "duplicate table id"),
    ("tables:\n  - {id: a, seeds: [0, x], rows: [{label: x}]}", "seeds must be"),
    ("tables:\n  - {id: a, rows: [{label: x}, {label: x}]}", "unique, non-empty label"),
    ("tables:\n  - {id: 'a b', rows: [{label: x}]}", "id must be"),
    ("tables:\n  - {id: a, colour: red, rows: [{label: x}]}", "unknown key(s) ['colour']"),
    ("eval: {splitt: test}\ntables:\n  - {id: a, rows: [{label: x}]}", "unknown config key"),
    ("command: train\ntables:\n  - {id: a, rows: [{label: x}]}", "command must be one of distill, adapt"),
    ("tables:\n  - {id: a, rows: [{label: x, export: m.pt, set: {seed: 1}}]}", "an export or trains with set"),
    ("tables:\n  - {id: a, rows: [{label: x}, {label: y}], differences: [[x, z]]}", "no row labelled 'z'"),
    ("tables:\n  - {id: a, rows: [{label: x}, {label: y}], differences: [x, y]}", "each entry is [row a, row b]"),
    ("command: classify\ntables:\n  - {id: a, rows: [{label: x}, {label: y}], differences: [[y, x]]}",
     "differences: is for retrieval tables"),
    ("tables:\n  - {id: a, rows: [{label: x}, {label: y}], claims: [{claim: c, better: x, than: [z]}]}",
     "no row labelled 'z'"),
    ("tables:\n  - {id: a, rows: [{label: x}, {label: y}], claims: [{claim: c, better: x}]}", "needs claim (text)"),
    ("tables:\n  - {id: a, rows: [{label: x}, {label: y}], claims: [{claim: c, better: x, than: x}]}",
     "compared with itself"),
    ("tables:\n  - {id: a, rows: [{label: x}, {label: y}], claims: [{claim: c, better: x, than: y, by: z}]}",
     "unknown key(s) ['by']"),
    ("command: classify\ntables:\n  - {id: a, rows: [{label: x}, {label: y}], claims: [{claim: c, better: x, "
     "than: y}]}", "claims: is for retrieval tables"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, body, fragment):
    path = tmp_path / "s.yaml"
    path.write_text("base_config: configs/openmoji-small.yaml\n" + body + "\n")
    with pytest.raises(PipelineError) as err:
        load_sweep(path)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_tables_extra_differences_pair_the_rows_it_names_seed_by_seed():
    from pipeline.experiments.tables import RowStats, row_differences

    def row(label, values, seeds=(0, 1, 2)):
        return RowStats(label, 3, [{"metrics": {"rsum": v}} for v in values], list(seeds))

    rows = [row("base", [10, 20, 30]), row("a", [15, 22, 40]), row("b", [11, 21, 31], seeds=(0, 1, 3))]
    diffs = {d.name: d for d in row_differences(rows, extra=[("a", "b")])}
    assert list(diffs) == ["a - base", "b - base", "a - b"]
    assert diffs["a - b"].seeds == [0, 1] and diffs["a - b"].values == [4.0, 1.0]  # seed 3 has no partner
    assert diffs["b - base"].values == [1.0, 1.0]
    assert [d.name for d in row_differences(rows)] == ["a - base", "b - base"]


def test_a_claim_holds_only_when_each_of_its_paired_differences_clears_the_spread_in_its_favour():
    from pipeline.experiments.sweep import Claim, SweepRow, SweepTable
    from pipeline.experiments.tables import RowStats, check_claims, render_claims

    def row(label, values, seeds=(0, 1, 2)):
        return RowStats(label, 3, [{"metrics": {"rsum": v}} for v in values], list(seeds))

    rows = [row("best", [100, 110, 120]), row("worse", [90, 101, 109]),  # +10, +9, +11: clears
            row("noisy", [95, 115, 118]),  # +5, -5, +2: inside the spread
            row("better", [110, 121, 129]),  # -10, -11, -9: clears the other way
            row("short", [90, 100], seeds=(0, 1))]  # two seeds: no verdict yet
    claims = {"holds": ["worse"], "contradicted": ["worse", "better"], "not shown": ["noisy"],
              "holds against 1 of 2": ["worse", "noisy"], "pending": ["worse", "short"]}
    table = SweepTable("t", "t", "", (0, 1, 2), tuple(SweepRow(r.label, {}) for r in rows),
                       claims=tuple(Claim(name, "best", tuple(than)) for name, than in claims.items()))
    checks = check_claims(table, rows)
    assert [c.verdict for c in checks] == list(claims)  # each claim is named after the verdict it must get
    assert [v["verdict"] for v in checks[1].as_dict()["comparisons"]] == ["holds", "reversed"]
    assert checks[0].as_dict()["comparisons"][0]["values"] == [10.0, 9.0, 11.0]
    text = render_claims(checks)
    assert "| holds against 1 of 2 |" in text and "vs short: +10.0 ± 0.0 (2 seeds, pending)" in text


def test_a_runs_best_val_rsum_is_read_from_its_metrics_log_and_rows_compare_on_val_where_they_have_it(tmp_path):
    from pipeline.experiments.records import best_val_rsum, read_record, record_val_rsum, write_record
    from pipeline.experiments.tables import VAL_RSUM, RowStats, row_differences

    run = tmp_path / "run"
    run.mkdir()
    lines = [{"kind": "train", "step": 1, "loss": 1.0}] + [{"kind": "val", "step": s, "rsum": v}
                                                           for s, v in ((2, 50.0), (4, 70.25), (6, 60.0))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    write_record(run, {"status": "training"})
    record_val_rsum(run)
    assert "best_val_rsum" not in read_record(run)  # not finished: nothing to keep yet
    write_record(run, {"status": "done"})
    record_val_rsum(run)
    assert best_val_rsum(run) == 70.25 and read_record(run)["best_val_rsum"] == 70.25
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "val", "step": 8, "rs')  # a torn line: the log is not used
    assert best_val_rsum(run) is None
    assert best_val_rsum(tmp_path / "no-run") is None

    def row(label, test, val):
        return RowStats(label, 3, [{"metrics": {"rsum": t, **({} if v is None else {VAL_RSUM: v})}}
                                   for t, v in zip(test, val)], [0, 1, 2])

    rows = [row("base", [10, 20, 30], [100, 110, 120]), row("a", [12, 21, 33], [90, None, 118])]
    (test_diff,) = row_differences(rows)
    (val_diff,) = row_differences(rows, VAL_RSUM)
    assert test_diff.values == [2.0, 1.0, 3.0]
    assert (val_diff.seeds, val_diff.values) == ([0, 2], [-10.0, -2.0])  # seed 1 has no val score
    assert rows[1].by_seed(VAL_RSUM) == {0: 90.0, 2: 118.0}


def test_update_document_markers(tmp_path):
    doc = tmp_path / "R.md"
    block = lambda tid, body: f"{start_marker(tid)}\n{body}\n{end_marker(tid)}"  # noqa: E731
    update_document(doc, {"a": block("a", "one"), "b": block("b", "two")}, "Results")
    doc.write_text(doc.read_text().replace("# Results\n", "# Results\n\nmine\n") + "tail\n")
    update_document(doc, {"b": block("b", "TWO"), "c": block("c", "three")}, "Results")
    text = doc.read_text()
    order = [text.index(w) for w in ("mine", "one", "TWO", "tail", "three")]
    assert order == sorted(order)
    assert "two" not in text.replace("TWO", "")
    doc.write_text(text.replace(end_marker("a"), ""))
    with pytest.raises(PipelineError, match="markers of table 'a' are broken"):
        update_document(doc, {"a": block("a", "x")}, "Results")


def test_an_adapt_sweep_trains_with_clipdistill_adapt_and_evaluates_an_export_row(data, tmp_path, monkeypatch):
    """command: adapt plans AdaptConfigs and trains them with `clipdistill adapt`; an export row (the start
    model) is evaluated as it is, once for all seeds; the teacher row comes from eval.cache_dir."""
    from pipeline.students import build_student, export_student, get_preset

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.manual_seed(0)
    start = export_student(build_student(get_preset("tiny", 16)), None, tmp_path / "start" / "student.pt",
                           meta={"run": "start"})
    base = tmp_path / "adapt.yaml"
    base.write_text(f"start: student:{start}\ndata: {{manifest_dir: {data.manifests}, workers: 0}}\n"
                    "optim: {batch_size: 4, unlabelled_batch_size: 4, epochs: 1, steps_per_epoch: 2}\n"
                    "consistency: {bank_size: 16, bank_min_fill: 8}\nlabelled_fraction: 0.3\n")
    sweep = tmp_path / "adapt-sweep.yaml"
    sweep.write_text(f"""name: adapt-tiny
command: adapt
base_config: {base}
eval: {{split: test, cache_dir: {data.cache}, latency_repeats: 0}}
tables:
  - id: adapt
    title: adaptation
    seeds: [0, 1]
    teacher: true
    rows:
      - {{label: start, export: {start}}}
      - {{label: supervised, set: {{mode: supervised}}}}
""")
    doc = tmp_path / "RESULTS.md"
    result = cli("experiments", "--sweep", sweep, "--runs-dir", tmp_path / "runs", "--results", doc, "--no-figures")
    assert result.exit_code == 0, result.output
    assert "4 cells (0 invalid) -> 3 unique runs" in result.output
    records = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/experiment.json")}
    assert sorted(r["status"] for r in records.values()) == ["done", "done", "done"]
    trained = [r for r in records.values() if "export" not in r]
    assert all(r["command"].startswith("clipdistill adapt --config") for r in trained)
    assert all((tmp_path / "runs" / r["name"] / "adapt.log").is_file() for r in trained)
    cfg = json.loads((tmp_path / "runs" / trained[0]["name"] / "config.json").read_text())
    assert cfg["mode"] == "supervised" and cfg["start"] == f"student:{start}"
    rows = table_rows(doc.read_text(), "adapt")
    assert len(rows) == 3 and next(iter(rows)).startswith("teacher")
    assert rows["start"]["Seeds"] == "1" and rows["supervised"]["Seeds"] == "2"  # the export: one evaluation
    start_result = json.loads(next((tmp_path / "runs").glob("e*/eval/result.json")).read_text())
    assert rows["start"]["RSUM"] == f"{start_result['metrics']['rsum']:.1f}"


def test_the_run_key_of_the_default_config_is_stable():
    # Every finished run is found again by this hash. A new config field changes it for every run unless it is
    # left out at its default (sweep.ADDED_KEYS) or, when it cannot change results, always (BOOKKEEPING_KEYS).
    key = run_key(cfgio.load(DistillConfig, None, []))
    assert key == "0dfd1b0526e4adf7e5cc84320d16f64dd4e5cf4169db58ca9bc6d01a0f673d2f", (
        "a config change altered every run's key: add the new field to ADDED_KEYS or BOOKKEEPING_KEYS in "
        "pipeline/experiments/sweep.py")
    # results-neutral settings do not enter the key; a setting that changes training does
    assert run_key(cfgio.load(DistillConfig, None, ["data.preload_limit_gb=1", "data.workers=3"])) == key
    assert run_key(cfgio.load(DistillConfig, None, ["optim.min_steps=1"])) != key


def test_sweeps_measured_with_the_6_epoch_default_keep_their_run_keys():
    # The default config went from 6 to 12 epochs (issue 14); sweeps measured before pin the old length, so their
    # finished runs are found again and their tables still mean what they say. Keys computed before the change.
    plans = {name: plan_sweep(load_sweep(ROOT / "sweeps" / f"{name}.yaml"), "runs")
             for name in ("openmoji", "recipe-line-icons")}
    keys = {(c.table, c.seed): c.key for plan in plans.values() for c in plan.cells}
    assert keys[("main", 0)] == "33bf35eb67e1a3063ac2d07a15d6fca9ce4ccc0715d8eebb0149942cbb1f8c24"
    assert keys[("recipe-full", 0)] == "0ae218f6982b8d6ead306a44af4a7fd23ac69a11b3371f3cb8cdcce555c9a97b"
    # the new default is a different run, 12 epochs long
    new = plans["recipe-line-icons"].runs[keys[("recipe-full-12", 0)]].config
    assert (new.optim.epochs, tuple(new.optim.decay_epochs)) == (12, (8,))
