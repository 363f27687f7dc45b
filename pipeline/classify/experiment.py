"""The classification experiment of method.md 4 as two resumable steps over one run folder.

    runs/<name>/config.json               resolved config (a rerun must match it; generations may be added)
    runs/<name>/head/, probe/             step 1: loop folders (checkpoints, metrics) + export/ + targets.h5
    runs/<name>/<text|notext>/gen-<g>/    step 2: one student generation: checkpoints, metrics,
                                          export/classifier.pt, targets.h5 (its soft predictions), result.json
    runs/<name>/results.json, results.md  every number: teachers and each generation, top-1/top-5 (+ Recall@K)

A finished part (its result.json exists) is skipped on rerun; an interrupted one continues with ``resume``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.common import paths
from pipeline.common import config as cfgio
from pipeline.common.distributed import resolve_device
from pipeline.common import io
from pipeline.common.errors import PipelineError
from pipeline.common.precision import check_precision
from pipeline.data.manifest import Manifest
from pipeline.classify.config import ClassifyConfig, comparable
from pipeline.classify.head import LinearProbe
from pipeline.classify.labels import class_list, sample_few_shot
from pipeline.classify.metrics import topk_accuracy
from pipeline.classify.report import classification_table
from pipeline.classify.splits import Queries, Split, open_split, queries_for
from pipeline.classify.student_training import caption_recall, new_student, student_retrieval, train_generation
from pipeline.classify.student import ImageRows, export_classifier, load_classifier, predict
from pipeline.classify.teacher_training import (
    build_head,
    evaluate_probs,
    export_teacher,
    head_probs,
    load_targets,
    probe_probs,
    save_targets,
    Step1Inputs,
    train_part,
)
from pipeline.train.options import TRAINING_PRECISIONS
from pipeline.train.state import load_checkpoint, one_process_per_run

TEACHER_PART = {"text": "head", "notext": "probe"}


@dataclass
class Data:
    classes: list[str]
    train: Split
    val: Optional[Split]
    test: Optional[Split]
    known: Optional[np.ndarray]  # few-shot: training positions whose labels the teachers see (None: all)
    short_classes: dict  # few-shot: classes with fewer than k images -> how many they had


def prepare_run(cfg: ClassifyConfig) -> Path:
    """Create or check ``runs/<name>``: an existing run must have been made with a compatible config."""
    run_dir = Path(cfg.runs_dir) / cfg.name
    saved_path = run_dir / "config.json"
    if saved_path.exists():
        saved = cfgio.load(ClassifyConfig, saved_path)
        a, b = cfgio.flatten(comparable(saved)), cfgio.flatten(comparable(cfg))
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise PipelineError(
                f"run {run_dir} was made with a different config ({', '.join(diff)}); choose another --name"
            )
    cfgio.save(cfg, saved_path)
    return run_dir


def load_data(cfg: ClassifyConfig) -> Data:
    train_manifest = paths.manifest_path(cfg.data.manifest_dir, cfg.data.train_split)
    manifest = Manifest.read(train_manifest)
    classes = class_list(manifest)
    if cfg.text.mode == "captions" and _captions_are_labels(manifest):
        raise PipelineError(
            f"the captions of {train_manifest} are the class names, which would hand the head "
            "its labels; use text.mode=prompts"
        )
    train = open_split(cfg, cfg.data.train_split, classes, required=True)
    val = open_split(cfg, cfg.data.val_split, classes, required=False)
    test = open_split(cfg, cfg.data.test_split, classes, required=False)
    known, short = None, {}
    if cfg.few_shot:
        known, short = sample_few_shot(train.images.image_ids, train.images.labels, cfg.few_shot, cfg.seed)
    return Data(classes, train, val, test, known, {classes[c]: n for c, n in short.items()})


def _captions_are_labels(manifest: Manifest) -> bool:
    t = manifest.table
    pairs = [
        (c or "").strip().lower() == (lab or "").replace("_", " ").strip().lower()
        for c, lab in zip(t.column("caption").to_pylist(), t.column("label").to_pylist())
        if lab
    ]
    return bool(pairs) and sum(pairs) > len(pairs) / 2


def _rounded(obj):
    if isinstance(obj, float):
        return round(obj, 2)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def _write_json(path: Path, obj: dict) -> Path:
    return io.write_json(path, _rounded(obj))


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def _metrics(probs_or_logits: np.ndarray, split: Optional[Split]) -> Optional[dict]:
    return None if split is None else evaluate_probs(probs_or_logits, split)


# ---- step 1 --------------------------------------------------------------------------------------------
@one_process_per_run
def run_step1(cfg: ClassifyConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train the head (text) and the probe (no text) on cached features; write their soft targets."""
    run_dir = prepare_run(cfg)
    device = torch.device(resolve_device(cfg.device))
    data = load_data(cfg)
    out = {}
    for kind, part in (("text", "head"), ("notext", "probe")):
        part_dir = run_dir / part
        done = _read_json(part_dir / "result.json")
        if done is not None:
            out[part] = done
            continue
        started = time.perf_counter()
        model, q, loop = train_part(part, cfg, part_dir,
                                    Step1Inputs(data.train, data.val, data.classes, data.known, device, resume, progress))

        def probs(split: Split, model=model, part=part, q=q):
            return teacher_probs(cfg, part, model, split, data.classes, q if split is data.train else None)

        train_probs = probs(data.train)
        folds = cfg.distill.oof_folds
        targets = out_of_fold_probs(cfg, kind, part_dir, data, device, resume, progress) if folds >= 2 else train_probs
        source = f"{part} (out of {folds} folds)" if folds >= 2 else part
        save_targets(part_dir / "targets.h5", data.train.images.image_ids, targets, data.classes, source)
        result = {
            "part": part,
            "best_epoch": loop.best_epoch + 1,
            "steps": loop.steps,
            "train": evaluate_probs(train_probs, data.train),
            # what the students learn from: in-sample predictions, or out-of-fold ones (their accuracy on the
            # training images is then an honest held-out number)
            "targets": {"kind": "out-of-fold" if folds >= 2 else "in-sample", "folds": folds,
                        "train": evaluate_probs(targets, data.train)},
            "val": _metrics(probs(data.val), data.val) if data.val else None,
            "test": _metrics(probs(data.test), data.test) if data.test else None,
            "seconds": round(time.perf_counter() - started, 1),
        }
        export_teacher(
            part_dir / "export" / f"{part}.pt",
            model,
            part,
            cfg,
            data.classes,
            {"val": result["val"], "test": result["test"]},
        )
        _write_json(part_dir / "result.json", result)
        out[part] = _read_json(part_dir / "result.json")
    _write_results(cfg, run_dir, data)
    return out


def fold_of(n: int, folds: int, seed: int) -> np.ndarray:
    """The fold of each of ``n`` training images: a seeded, balanced assignment."""
    return np.random.default_rng([seed, 0x6F6F66]).permutation(n) % folds


def out_of_fold_probs(cfg: ClassifyConfig, kind: str, part_dir: Path, data: Data, device, resume: bool,
                      progress: bool) -> np.ndarray:
    """(N, K) soft targets where image i's row comes from a head / probe trained without i's fold (method.md 4;
    the labelled subset of few-shot runs is split the same way). Each fold model is its own resumable loop
    folder (``<part>/fold-<f>``)."""
    n, folds = len(data.train), cfg.distill.oof_folds
    fold = fold_of(n, folds, cfg.seed)
    labelled = np.arange(n) if data.known is None else np.asarray(data.known)
    out = np.zeros((n, len(data.classes)), np.float32)
    for f in range(folds):
        fold_dir = part_dir / f"fold-{f}"
        subset = labelled[fold[labelled] != f]
        again = resume or paths.last_checkpoint(fold_dir).exists()  # a finished fold is reloaded, not retrained
        model, q, _ = train_part(TEACHER_PART[kind], cfg, fold_dir,
                                 Step1Inputs(data.train, data.val, data.classes, subset, device, again, progress))
        p = teacher_probs(cfg, TEACHER_PART[kind], model, data.train, data.classes, q)
        out[fold == f] = p[fold == f]
    return out


# ---- step 2 --------------------------------------------------------------------------------------------
@one_process_per_run
def run_step2(cfg: ClassifyConfig, resume: bool = False, progress: bool = True) -> dict:
    """Every student generation for every teacher kind (distill.teachers), then the results table."""
    check_precision(cfg.precision, TRAINING_PRECISIONS)
    run_dir = prepare_run(cfg)
    device = torch.device(resolve_device(cfg.device))
    data = load_data(cfg)
    for kind in cfg.distill.teachers:
        if kind not in TEACHER_PART:
            raise PipelineError(f"distill.teachers entries must be text or notext, not {kind!r}")
    arch = dict(cfg.distill.arch) or data.train.tokens.arch
    images: Optional[ImageRows] = None
    for kind in cfg.distill.teachers:
        source = run_dir / TEACHER_PART[kind] / "targets.h5"
        for g in range(1, cfg.distill.generations + 1):
            gen_dir = run_dir / kind / f"gen-{g}"
            if (gen_dir / "result.json").exists():
                source = gen_dir / "targets.h5"
                continue
            started = time.perf_counter()
            targets = load_targets(source, data.train.images.image_ids, data.classes)
            model = new_student(cfg, arch, len(data.classes), g)
            if images is None:  # decoded once, shared by every generation
                images = ImageRows(
                    data.train.images.locations,
                    model.transform(train=True),
                    cfg.seed,
                    int(cfg.distill.image_size * 1.15) if cfg.distill.preload else None,
                )
            images.seed = cfg.seed + g
            loop = train_generation(
                cfg,
                gen_dir,
                model,
                g,
                data.train,
                images,
                targets,
                data.known,
                data.val,
                device,
                resume,
                progress,
            )
            result = _report_generation(cfg, gen_dir, model, data, kind, g, loop, source)
            result["seconds"] = round(time.perf_counter() - started, 1)
            _write_json(gen_dir / "result.json", result)
            result = _read_json(gen_dir / "result.json")
            source = gen_dir / "targets.h5"
            if progress:
                t = result["test"] or result["val"] or {}
                print(
                    f"{kind} gen {g}: test top-1 {t.get('top1', float('nan')):.1f} / top-5 "
                    f"{t.get('top5', float('nan')):.1f} ({result['seconds']:.0f} s)"
                )
    return _write_results(cfg, run_dir, data)


def student_metrics(cfg: ClassifyConfig, model, split: Split) -> tuple[dict, np.ndarray]:
    """A student's accuracies on a split's decodable images, and its features of every image."""
    lg, feats, ok = predict(model, split.images.locations, cfg.eval_batch_size, cfg.data.workers,
                            cfg.precision)
    return topk_accuracy(torch.from_numpy(lg[ok]), torch.from_numpy(split.images.labels[ok])), feats


def teacher_probs(cfg: ClassifyConfig, part: str, model, split: Split, classes: list[str],
                  queries: Optional[Queries] = None) -> np.ndarray:
    """The head's (its queries for the split: class prompts, or the split's own captions) or the probe's
    class probabilities for a split's images."""
    if part == "head":
        return head_probs(model, split, queries or queries_for(cfg, split, classes))
    return probe_probs(model, split)


def _report_generation(cfg, gen_dir: Path, model, data: Data, kind: str, g: int, loop, source: Path) -> dict:
    bs, workers = cfg.eval_batch_size, cfg.data.workers
    logits, feats, ok = predict(model, data.train.images.locations, bs, workers, cfg.precision)
    probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
    probs[~ok] = load_targets(source, data.train.images.image_ids, data.classes)[~ok]  # keep the old targets
    save_targets(gen_dir / "targets.h5", data.train.images.image_ids, probs, data.classes, f"{kind} gen {g}")
    result = {
        "kind": kind,
        "generation": g,
        "best_epoch": loop.best_epoch + 1,
        "steps": loop.steps,
        "train": evaluate_probs(probs, data.train),
        "val": None,
        "test": None,
    }
    for name in ("val", "test"):
        split = getattr(data, name)
        if split is None:
            continue
        result[name], f = student_metrics(cfg, model, split)
        if name == "test" and cfg.retrieval and split.tokens.has_captions:
            result["retrieval"] = student_retrieval(feats[ok], data.train, f, split)
    export_classifier(
        model,
        gen_dir / "export" / "classifier.pt",
        data.classes,
        {
            "kind": kind,
            "generation": g,
            "teacher": data.train.tokens.meta.teacher_fingerprint,
            "val": result["val"],
            "test": result["test"],
        },
    )
    return result


# ---- results -------------------------------------------------------------------------------------------
def _write_results(cfg: ClassifyConfig, run_dir: Path, data: Data) -> dict:
    counts = Counter(data.train.images.labels.tolist())
    majority = max(counts, key=counts.get)
    meta = data.train.tokens.meta
    results = {
        "run": cfg.name,
        "teacher": cfg.teacher,
        "teacher_name": meta.teacher_name,
        "teacher_fingerprint": meta.teacher_fingerprint,
        "manifest_dir": cfg.data.manifest_dir,
        "text_mode": cfg.text.mode,
        "templates": list(cfg.text.templates),
        "few_shot": cfg.few_shot,
        "few_shot_short_classes": data.short_classes,
        "classes": data.classes,
        "images": {s.name: len(s) for s in (data.train, data.val, data.test) if s is not None},
        "skipped": {s.name: s.images.skipped for s in (data.train, data.val, data.test) if s is not None},
        "student": {
            "arch": dict(cfg.distill.arch) or data.train.tokens.arch,
            "image_size": cfg.distill.image_size,
            "epochs": cfg.distill.epochs,
            "init": cfg.distill.init_weights or "random",
        },
        "majority_class": {
            "class": data.classes[majority],
            **(
                {"test_top1": round(float(np.mean(data.test.images.labels == majority) * 100), 2)}
                if data.test is not None
                else {}
            ),
        },
        "head": _read_json(run_dir / "head" / "result.json"),
        "probe": _read_json(run_dir / "probe" / "result.json"),
        "students": {},
    }
    if cfg.retrieval and data.test is not None and data.test.tokens.has_captions:
        results["teacher_retrieval"] = caption_recall(
            data.test.tokens.embedding(data.test.positions), data.test
        )
    for kind in TEACHER_PART:
        gens = sorted((run_dir / kind).glob("gen-*/result.json"), key=lambda p: int(p.parent.name[4:]))
        if gens:
            results["students"][kind] = [json.loads(p.read_text()) for p in gens]
    # both steps done for this config: what the experiment runner counts as a finished run
    results["complete"] = bool(results["head"] and results["probe"]) and all(
        len(results["students"].get(kind, [])) >= cfg.distill.generations for kind in cfg.distill.teachers
    )
    _write_json(run_dir / "results.json", results)
    (run_dir / "results.md").write_text(classification_table([results]) + "\n")
    return results


# ---- re-evaluation -------------------------------------------------------------------------------------
def measured_today(run_dir: Path) -> bool:
    """Whether every model of a finished run already carries every metric today's code measures."""
    current = set(topk_accuracy(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)))
    parts = [run_dir / part / "result.json" for part in TEACHER_PART.values()]
    parts += [p for kind in TEACHER_PART for p in (run_dir / kind).glob("gen-*/result.json")]
    models = [json.loads(p.read_text()) for p in parts if p.is_file()]
    measured = [m.get(split) for m in models for split in ("val", "test")]
    measured += [m["targets"]["train"] for m in models if m.get("targets")]  # what the students learnt from
    return all(current <= set(x or current) for x in measured)


def _remeasured(where: str, name: str, old: Optional[dict], new: dict, n_images: int) -> dict:
    """The new metrics, once the stored top-1 comes back (within one image: thread counts can flip a near tie)."""
    if old and abs(old["top1"] - new["top1"]) > 100.0 / max(n_images, 1) + 0.01:
        raise PipelineError(f"{where}: re-evaluated {name} top-1 {new['top1']:.2f} is not the stored "
                            f"{old['top1']:.2f}; its export does not reproduce the run, so nothing was rewritten")
    return new


@one_process_per_run
def reevaluate(cfg: ClassifyConfig, progress: bool = True) -> dict:
    """Measure a finished run's models again on val and test from their exports (nothing is retrained), with the
    metrics of today's code, e.g. balanced top-1 for a run made before it existed; rewrite results.json."""
    run_dir = Path(cfg.runs_dir) / cfg.name
    if not (run_dir / "results.json").is_file():
        raise PipelineError(f"{run_dir} has no results.json: only a run that has finished can be re-evaluated")
    prepare_run(cfg)  # the config must be the run's own
    device = torch.device(resolve_device(cfg.device))
    data = load_data(cfg)
    splits = [(name, getattr(data, name)) for name in ("val", "test") if getattr(data, name) is not None]
    updates: dict[Path, dict] = {}  # checked first, written together: a refused run keeps every old number
    for part in TEACHER_PART.values():
        path = run_dir / part / "result.json"
        if not path.is_file():
            continue
        result, model = json.loads(path.read_text()), load_teacher_export(cfg, part, run_dir, data).to(device)
        for name, split in splits:
            new = evaluate_probs(teacher_probs(cfg, part, model, split, data.classes), split)
            result[name] = _remeasured(f"{run_dir}/{part}", name, result.get(name), new, len(split))
        if result.get("targets"):  # the soft targets as stored, e.g. out-of-fold ones (no fold model is kept)
            stored = load_targets(run_dir / part / "targets.h5", data.train.images.image_ids, data.classes)
            result["targets"]["train"] = _remeasured(f"{run_dir}/{part} targets", "train", result["targets"]["train"],
                                                     evaluate_probs(stored, data.train), len(data.train))
        updates[path] = result
    for kind in TEACHER_PART:
        for path in sorted((run_dir / kind).glob("gen-*/result.json")):
            result = json.loads(path.read_text())
            model, _ = load_classifier(path.parent / "export" / "classifier.pt", device)
            for name, split in splits:
                new, _ = student_metrics(cfg, model, split)
                result[name] = _remeasured(str(path.parent), name, result.get(name), new, len(split))
            updates[path] = result
            if progress:
                print(f"re-evaluated {path.parent.relative_to(run_dir)}: test {result.get('test')}")
    for path, result in updates.items():
        _write_json(path, {**result, "reevaluated": True})
    return _write_results(cfg, run_dir, data)


def load_teacher_export(cfg: ClassifyConfig, part: str, run_dir: Path, data: Data) -> torch.nn.Module:
    """The head or probe of ``run_dir`` from its export (``export_teacher``)."""
    path = run_dir / part / "export" / f"{part}.pt"
    blob = load_checkpoint(path, f"{part} export")
    ok = isinstance(blob, dict) and blob.get("format") == f"clipdistill-{part}/1"
    if not ok or blob.get("classes") != data.classes:
        raise PipelineError(f"{path} is not the {part} export of this run's classes")
    k = len(data.classes)
    model = (build_head(cfg, data.train.tokens, k) if part == "head"
             else LinearProbe(blob["state_dict"]["linear.weight"].shape[1], k))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


@one_process_per_run
def run_both(cfg: ClassifyConfig, resume: bool = False, progress: bool = True) -> dict:
    """Step 1 then step 2 (``clipdistill classify``; one cell of a classification sweep)."""
    run_step1(cfg, resume=resume, progress=progress)
    return run_step2(cfg, resume=resume, progress=progress)


__all__ = ["run_step1", "run_step2", "run_both", "reevaluate", "measured_today", "prepare_run", "load_data"]
