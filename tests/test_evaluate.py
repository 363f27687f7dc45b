"""Stage 3 end to end on a generated dataset: evaluation records, FAISS recall vs a reference, the report,
skip-if-fresh, the search command, and one-line errors for bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from pipeline.common import config as cfgio
from pipeline.features.cache import FeatureCache
from pipeline.features.encode import SplitEmbeddings, embed_manifest
from pipeline.common.errors import PipelineError
from pipeline.retrieval.evaluate import (
    RESULT_FORMAT, EvalIndex, evaluate_student, evaluate_teacher_cache, is_fresh, retrieval, save_outputs,
)
from pipeline.data.manifest import Manifest
from pipeline.retrieval.metrics import brute_force_recall
from pipeline.retrieval.report import HEADER
from pipeline.students import build_student, count_params, export_student, get_preset, load_student
from pipeline.distill.trainer import DistillConfig, train
from stages.evaluate import evaluate
from stages.search import search
from tests.fake_teacher import FakeTeacher
from tests.gen_cache import make_dataset

torch.set_num_threads(1)
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")

app = typer.Typer()
app.command("eval")(evaluate)
app.command("search")(search)


def cli(*args: str):
    """Run a command in-process; PipelineErrors come back as ``result.exception`` (the CLI prints them)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, PipelineError):
        raise result.exception
    return result


def one_line_error(result, *fragments: str) -> str:
    assert isinstance(result.exception, PipelineError), result.output
    msg = str(result.exception)
    assert "\n" not in msg and all(f in msg for f in fragments), msg
    return msg


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Generated dataset + fake-teacher cache, one briefly trained tiny run and one untrained export."""
    from tests.gen_cache import make_cache

    root = tmp_path_factory.mktemp("stage3")
    manifests = make_dataset(root)
    cache_dir = make_cache(manifests, root / "cache")
    runs = root / "runs"
    cfg = cfgio.load(DistillConfig, None, [
        f"data.manifest_dir={manifests}", f"data.cache_dir={cache_dir}", "student=tiny", f"runs_dir={runs}",
        "name=trained", "optim.batch_size=24", "optim.epochs=2", "queue.size=32", "data.workers=0",
        "log_every=1"])
    train(cfg, progress=False)
    cache = FeatureCache(cache_dir / "test")
    export_student(build_student(get_preset("tiny", embed_dim=cache.width)), None,
                   runs / "untrained" / "export" / "student.pt",
                   meta={"teacher_fingerprint": cache.meta.teacher_fingerprint, "run": "untrained"})
    return SimpleNamespace(root=root, manifests=manifests, cache_dir=cache_dir, runs=runs, cache=cache,
                           manifest=Manifest.read(manifests / "test.parquet"))


def eval_args(env, out: Path, *extra) -> list:
    return ["eval", *extra, "--cache-dir", env.cache_dir, "--manifest-dir", env.manifests, "--out", out,
            "--runs-dir", env.runs, "--workers", 0, "--latency-repeats", 2, "--device", "cpu"]


@pytest.fixture(scope="module")
def evaluated(env):
    out = env.root / "eval"
    result = cli(*eval_args(env, out))
    assert result.exit_code == 0, result.output
    return SimpleNamespace(out=out, output=result.output,
                           teacher=json.loads((out / "teacher-fake" / "result.json").read_text()),
                           trained=json.loads((out / "trained" / "result.json").read_text()),
                           untrained=json.loads((out / "untrained" / "result.json").read_text()))


# ---- results ---------------------------------------------------------------------------------------


def test_result_records(env, evaluated):
    n_images = len(set(env.manifest.column("image_id").tolist()))
    fingerprint = env.cache.meta.teacher_fingerprint
    for r in (evaluated.teacher, evaluated.trained, evaluated.untrained):
        assert r["format"] == RESULT_FORMAT and r["split"] == "test" and r["dataset"] == "shapes"
        assert r["teacher_fingerprint"] == fingerprint
        assert set(r["metrics"]) == set(METRIC_KEYS)
        assert (r["n_images"], r["n_captions"]) == (n_images, len(env.manifest))
        assert r["captions_policy"] == "all captions kept" and r["n_captions_dropped"] == 0
        assert r["exact"] and r["index"]["i2t"]["factory"] == r["index"]["t2i"]["factory"] == "Flat"
        assert r["index"]["i2t"]["n_vectors"] == len(env.manifest)
        assert r["index"]["t2i"]["n_vectors"] == n_images
        for f in r["files"].values():
            assert (evaluated.out / r["name"] / f).stat().st_size > 0
    assert evaluated.teacher["kind"] == "teacher"
    assert evaluated.teacher["params"] is None  # the fake teacher cannot be rebuilt from a cache
    assert evaluated.teacher["speed"] is None and "cannot be rebuilt" in evaluated.teacher["cost_note"]
    student = evaluated.trained
    assert student["kind"] == "student" and student["student_preset"] == "tiny"
    assert student["params"] == count_params(load_student(student["export_path"]).model)
    assert student["params"]["total"] > 0
    speed = student["speed"]
    assert speed["image_latency_s"] > 0 and speed["text_latency_s"] > 0 and speed["settings_repeats"] == 2
    assert speed["image_throughput"] > 0 and speed["text_throughput"] > 0
    assert student["device"].startswith("cpu")
    assert Path(student["run_dir"]).name == "trained" and evaluated.untrained["run_dir"] is None


def _load(path: Path) -> dict:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


@pytest.mark.parametrize("model", ["teacher-fake", "trained", "untrained"])
def test_exact_faiss_recall_equals_brute_force(evaluated, model):
    d = _load(evaluated.out / model / "embeddings.npz")
    reference = brute_force_recall(d["image_emb"], d["text_emb"], d["text_image_idx"])
    stored = json.loads((evaluated.out / model / "result.json").read_text())["metrics"]
    for key in METRIC_KEYS:
        assert stored[key] == pytest.approx(reference[key], abs=1e-9), key


def test_evaluated_embeddings_are_the_models(env, evaluated):
    """The saved galleries are the teacher's cache rows and the student's own embeddings, with the right
    ground truth (recomputed here from the manifest, not from the saved index arrays)."""
    cache, manifest = env.cache, env.manifest
    teacher = _load(evaluated.out / "teacher-fake" / "embeddings.npz")
    img = cache.image.to_array().astype(np.float64)
    unit = img / np.linalg.norm(img, axis=1, keepdims=True)
    np.testing.assert_allclose(teacher["image_emb"], unit, atol=1e-6)
    image_of_sample = dict(zip(manifest.column("sample_id").tolist(), manifest.column("image_id").tolist()))
    truth = [image_of_sample[int(s)] for s in teacher["sample_ids"]]
    assert teacher["image_ids"][teacher["text_image_idx"]].tolist() == truth

    student = _load(evaluated.out / "trained" / "embeddings.npz")
    fresh = embed_manifest(load_student(evaluated.trained["export_path"]), manifest, workers=0)
    np.testing.assert_allclose(student["image_emb"], fresh.image_emb, atol=1e-5)
    np.testing.assert_allclose(student["text_emb"], fresh.text_emb, atol=1e-5)
    assert student["image_ids"][student["text_image_idx"]].tolist() == [image_of_sample[int(s)]
                                                                        for s in student["sample_ids"]]
    # The teacher's cached embeddings of the same ids travel with the student's (PCA figure).
    np.testing.assert_array_equal(student["teacher_sample_ids"], student["sample_ids"])
    np.testing.assert_allclose(student["teacher_text_emb"], cache.texts_by_sample_id(student["sample_ids"]))


# ---- report ----------------------------------------------------------------------------------------


def _table(markdown: str) -> list[list[str]]:
    lines = [ln for ln in markdown.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_report_table_and_figures(evaluated):
    report = (evaluated.out / "report.md").read_text()
    rows = _table(report.split("## Speed")[0])
    assert tuple(rows[0]) == HEADER
    body = rows[2:]
    assert [r[0] for r in body] == ["teacher-fake (teacher)", "trained (student)", "untrained (student)"]
    col = {name: i for i, name in enumerate(HEADER)}
    teacher_rsum = evaluated.teacher["metrics"]["rsum"]
    for row, r in zip(body, (evaluated.teacher, evaluated.trained, evaluated.untrained)):
        assert row[col["RSUM"]] == f"{r['metrics']['rsum']:.1f}"
        assert row[col["t2i R@5"]] == f"{r['metrics']['t2i_r5']:.1f}"
        assert row[col["% of teacher RSUM"]] == f"{100 * r['metrics']['rsum'] / teacher_rsum:.1f}%"
    assert body[0][col["Params"]] == "-" and body[1][col["Params"]].endswith("M")
    speed = evaluated.trained["speed"]
    latency = f"{1e3 * speed['image_latency_s']:.2f} / {1e3 * speed['text_latency_s']:.2f}"
    assert body[1][col["Latency img / txt (ms)"]] == latency
    figures = evaluated.out / "figures"
    names = sorted(p.name for p in figures.glob("*.png"))
    assert names == ["pca-trained.png", "pca-untrained.png", "recall.png", "training-trained.png"]
    for p in figures.glob("*.png"):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"figures/{p.name}" in report and str(p) in evaluated.output
    assert "all captions kept" in report and "exact search" in report


# ---- skip-if-fresh ---------------------------------------------------------------------------------


def test_skip_if_fresh(env, tmp_path):
    out = tmp_path / "eval"
    args = eval_args(env, out, env.runs / "untrained", "--no-report", "--truncate-captions")
    args[args.index("--latency-repeats") + 1] = 0

    def mtimes():
        return {m: (out / m / "result.json").stat().st_mtime_ns for m in ("teacher-fake", "untrained")}

    first = cli(*args)
    assert first.exit_code == 0 and "up to date" not in first.output and not (out / "report.md").exists()
    before = mtimes()
    stored = json.loads((out / "untrained" / "result.json").read_text())
    assert stored["max_captions_per_image"] == 5 and stored["captions_policy"] == "first 5 captions per image"
    again = cli(*args)
    assert again.output.count("up to date") == 2 and mtimes() == before

    export = env.runs / "untrained" / "export" / "student.pt"
    stamp = os.stat(export).st_mtime
    newer = (out / "untrained" / "result.json").stat().st_mtime + 5
    try:
        os.utime(export, (newer, newer))  # the export changed after it was evaluated
        touched = cli(*args)
    finally:
        os.utime(export, (stamp, stamp))
    assert "teacher-fake: up to date" in touched.output and "untrained: up to date" not in touched.output
    after = mtimes()
    assert after["teacher-fake"] == before["teacher-fake"] and after["untrained"] != before["untrained"]

    # Other settings make a fresh result stale; --force re-evaluates regardless.
    settings = json.loads((out / "untrained" / "result.json").read_text())["settings"]
    assert is_fresh(out / "untrained", [export], settings)
    assert not is_fresh(out / "untrained", [export], {**settings, "max_captions_per_image": None})
    assert not is_fresh(out / "untrained", [export], {**settings, "index": "auto"})
    forced = cli(*args, "--force")
    assert "up to date" not in forced.output and mtimes()["teacher-fake"] != after["teacher-fake"]


# ---- library paths the CLI run does not take --------------------------------------------------------


def test_truncation_approximate_index_and_teacher_cost(env, tmp_path):
    cache, manifest = env.cache, env.manifest
    r = evaluate_teacher_cache(cache, manifest, "HNSW8,Flat", teacher=FakeTeacher(width=cache.width),
                               max_captions_per_image=1, speed=None, out_dir=tmp_path / "t")
    n_images = len(cache.image_ids)
    assert (r["n_images"], r["n_captions"]) == (n_images, n_images)
    assert r["n_captions_dropped"] == len(cache.sample_ids) - n_images
    assert r["captions_policy"] == "first 1 captions per image"
    assert not r["exact"] and r["index"]["t2i"]["factory"] == "HNSW8,Flat" and r["index"]["t2i"]["ef_search"]
    assert r["params"] == {"total": 0}  # FakeTeacher has no torch modules
    assert r["cost_note"] == "given teacher"
    d = _load(tmp_path / "t" / "embeddings.npz")
    assert len(d["text_emb"]) == n_images and len(np.unique(d["text_image_idx"])) == n_images
    # HNSW on 9 vectors visits all of them, so even the approximate search equals the reference here.
    ref = brute_force_recall(d["image_emb"], d["text_emb"], d["text_image_idx"])
    assert r["metrics"]["rsum"] == pytest.approx(ref["rsum"])

    with pytest.raises(PipelineError, match="was made by"):
        evaluate_teacher_cache(cache, manifest, teacher=FakeTeacher(width=cache.width, seed=1), speed=None)
    with pytest.raises(PipelineError, match="factory"):
        evaluate_teacher_cache(cache, manifest, "NotAnIndex42", speed=None)


def test_bad_inputs_give_one_line_errors(env, tmp_path):
    out = tmp_path / "eval"
    one_line_error(cli(*eval_args(env, out, tmp_path / "no-such-run")), "not found", "no-such-run")
    (tmp_path / "empty-run").mkdir()
    one_line_error(cli(*eval_args(env, out, tmp_path / "empty-run")), "no student export")
    # A manifest the cache was not built from (another generated dataset).
    other = make_dataset(tmp_path / "other", n_images=30, seed=1)
    args = eval_args(env, out)
    args[args.index("--manifest-dir") + 1] = other
    one_line_error(cli(*args), "manifest")
    args = eval_args(env, out, "--split", "nosuch")
    one_line_error(cli(*args), "nosuch")
    with pytest.raises(PipelineError, match="manifest"):
        export = env.runs / "untrained" / "export" / "student.pt"
        evaluate_student(export, Manifest.read(other / "test.parquet"), env.cache, speed=None)
    one_line_error(cli("search", tmp_path / "nowhere", "a red circle"), "no evaluation result")
    assert not out.exists() or not any(out.glob("*/result.json"))


# ---- search ----------------------------------------------------------------------------------------


def _handmade(tmp_path: Path, n_images: int = 6, per_image: int = 2,
              dim: int = 8) -> tuple[Path, SplitEmbeddings]:
    """An evaluation folder written from hand-made embeddings: caption j is a small perturbation of its
    image, so the right image for each caption is known."""
    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    images = unit(rng.standard_normal((n_images, dim)))
    idx = np.repeat(np.arange(n_images), per_image)
    texts = unit(images[idx] + 0.05 * rng.standard_normal((len(idx), dim)))
    emb = SplitEmbeddings(np.arange(100, 100 + n_images), images, np.arange(len(idx)), texts, idx, [])
    from PIL import Image

    locations = []
    for i in range(n_images):
        locations.append(str(tmp_path / f"img{i}.png"))
        Image.new("RGB", (20, 20), (40 * i, 100, 200)).save(locations[-1])
    captions = [f"caption {j} of image {i}" for j, i in enumerate(idx)]
    metrics, galleries = retrieval(emb, "exact", gpu=False)
    record = {"format": RESULT_FORMAT, "name": "handmade", "kind": "teacher", "metrics": metrics}
    save_outputs(tmp_path / "handmade", record, emb, galleries, locations, captions)
    return tmp_path / "handmade", emb


def test_search_finds_the_known_image(tmp_path):
    folder, emb = _handmade(tmp_path)
    index = EvalIndex(folder)
    for j, i in enumerate(emb.text_image_idx.tolist()):
        res = index.search(f"caption {j} of image {i}", k=3)
        assert res.kind == "text" and res.embedded_by == "stored"
        assert res.hits[0].image_id == 100 + i and res.hits[0].relevant
        assert [h.score for h in res.hits] == sorted((h.score for h in res.hits), reverse=True)
    res = index.search(str(tmp_path / "img2.png"), k=2)
    assert res.kind == "image"
    assert {h.caption for h in res.hits} == {"caption 4 of image 2", "caption 5 of image 2"}
    assert all(h.relevant for h in res.hits)

    queries = tmp_path / "queries.txt"
    queries.write_text(f"caption 7 of image 3\n\n{tmp_path / 'img1.png'}\n")
    page = tmp_path / "page" / "results.html"
    result = cli("search", folder, "caption 0 of image 0", "-k", 2, "--queries-file", queries, "--html", page)
    assert result.exit_code == 0, result.output
    assert "1.  " in result.output and "image 100" in result.output and " *" in result.output
    html = page.read_text()
    assert html.count("<h2>") == 3 and "caption 7 of image 3" in html
    assert html.count("data:image/png;base64,") >= 6
    one_line_error(cli("search", folder, "a caption nobody wrote"), "no model recorded")
    one_line_error(cli("search", folder, str(tmp_path / "missing.png")), "not found")


def test_search_student_embeds_new_queries(evaluated):
    folder = evaluated.out / "trained"
    index = EvalIndex(folder)
    query = "a completely new caption about a green square"
    res = index.search(query, k=4)
    student = load_student(evaluated.trained["export_path"])
    assert res.embedded_by == student.name
    q = student.encode_texts(student.tokenize([query])).numpy()[0]
    d = _load(folder / "embeddings.npz")
    scores = d["image_emb"] @ q
    top = np.argsort(-scores)[:4]
    assert [h.image_id for h in res.hits] == d["image_ids"][top].tolist()
    np.testing.assert_allclose([h.score for h in res.hits], scores[top], atol=1e-5)


def test_exports_of_another_teacher_or_dataset_are_skipped_with_the_reason(env, tmp_path):
    """`make eval DATASET=x` after runs of another dataset: those are listed as skipped, the rest evaluated."""
    runs = tmp_path / "runs"
    model = build_student(get_preset("tiny", embed_dim=env.cache.width))
    export_student(model, None, runs / "mine" / "export" / "student.pt",
                   meta={"teacher_fingerprint": env.cache.meta.teacher_fingerprint, "run": "mine"})
    export_student(model, None, runs / "openmoji-demo" / "export" / "student.pt",
                   meta={"teacher_fingerprint": "lit-0123456789ab", "dataset": "openmoji", "run": "openmoji-demo"})
    args = eval_args(env, tmp_path / "eval")
    args[args.index("--runs-dir") + 1] = runs
    result = cli(*args)
    assert result.exception is None, result.output
    skipped = [line for line in result.output.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and "openmoji-demo" in skipped[0] and "lit-0123456789ab" in skipped[0]
    assert (tmp_path / "eval" / "mine" / "result.json").is_file()
    assert not (tmp_path / "eval" / "openmoji-demo").exists()
    # Named explicitly, a foreign run is an error, not a silent skip.
    one_line_error(cli(*eval_args(env, tmp_path / "eval2", runs / "openmoji-demo")), "distilled from teacher")


def test_a_run_that_never_read_the_teacher_belongs_to_any_teacher_cache_of_its_dataset(env, tmp_path):
    """A pairs-only run records its cache's teacher, but no loss read that teacher's targets: after the cache is
    rebuilt with a better teacher it is still evaluated (the baseline row of the same table)."""
    from pipeline.distill.trainer import export_reads_teacher
    from pipeline.retrieval.evaluate import foreign_export_reason

    model = build_student(get_preset("tiny", embed_dim=env.cache.width))
    pairs_only = {"losses": {"cd": False, "fd": False, "sd": False, "hnd": False, "pair": True}}
    distilled = {"losses": {"cd": True, "fd": True, "sd": True, "hnd": True, "pair": True}}
    for name, recipe, foreign in (("pairs", pairs_only, False), ("dsmd", distilled, True)):
        path = export_student(model, None, tmp_path / name / "student.pt",
                              meta={"teacher_fingerprint": "old-teacher-0123", "recipe": recipe})
        assert bool(foreign_export_reason(path, env.cache, export_reads_teacher)) == foreign, name
