"""Stage 3: retrieval evaluation of students and teachers, and querying what it saved (method.md section 2).

A student export is run over the split (each unique image once, every caption); a teacher is read from
its stage-1 cache and never run for the recalls. Both go through the same FAISS search and the same
recall code, and each model gets one output folder:

    <out>/<name>/result.json          metrics, model facts, index params, speed (RESULT_FORMAT)
    <out>/<name>/image.index(.json)   FAISS gallery of the images     } searched by EvalIndex /
    <out>/<name>/text.index(.json)    FAISS gallery of the captions   } `clipdistill search`
    <out>/<name>/embeddings.npz       ids, embeddings, captions and image locations of both galleries;
                                      for students also the teacher's cached embeddings of the same ids
                                      (the PCA figure of pipeline.retrieval.report compares the two spaces)

``result.json`` is written last, so its presence means the folder is complete; its mtime is what
:func:`is_fresh` compares against the model file.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pipeline.features.cache import FeatureCache
from pipeline.features.encode import SplitEmbeddings, embed_manifest
from pipeline.common import io
from pipeline.common.errors import PipelineError
from pipeline.data.images import ImageDecodeError, load_rgb
from pipeline.retrieval.index import BuiltIndex, IndexSpec, build_index, choose_index, load_index, save_index, search
from pipeline.data.manifest import Manifest
from pipeline.retrieval.metrics import DEFAULT_KS, check_inputs, recall_at_k, truncate_captions
from pipeline.students import StudentEncoder, count_params, flops_per_item, load_student
from pipeline.teachers import Teacher, load_teacher
from pipeline.teachers.base import to_device
from pipeline.common import paths

RESULT_FORMAT = "clipdistill-eval/1"
RESULT_FILE, EMBEDDINGS_FILE = "result.json", "embeddings.npz"
IMAGE_INDEX, TEXT_INDEX = "image.index", "text.index"
TRUNCATED_CAPTIONS = 5  # the published protocols' captions per image (method.md section 2)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def safe_name(name: str) -> str:
    """A model name usable as a folder or file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


# ---- retrieval through FAISS --------------------------------------------------------------------


def index_spec(index: str, n_vectors: int, dim: int) -> IndexSpec:
    """The user's index choice for one gallery: "exact" (IndexFlatIP, the published protocol), "auto"
    (``choose_index``'s size rules) or a FAISS factory string."""
    index = (index or "").strip()
    if not index:
        raise PipelineError("index must be 'exact', 'auto' or a FAISS factory string")
    if index == "exact":
        return IndexSpec("Flat", reason="exact search (default)")
    return choose_index(n_vectors, dim, factory=None if index == "auto" else index)


@dataclass
class Galleries:
    """The two searched galleries; ``kept_captions`` are the rows of the split's captions in ``text``."""

    image: BuiltIndex
    text: BuiltIndex
    kept_captions: np.ndarray


def retrieval(emb: SplitEmbeddings, index: str = "exact", max_captions_per_image: int | None = None,
              gpu: bool | str = "auto", ks: Sequence[int] = DEFAULT_KS) -> tuple[dict[str, Any], Galleries]:
    """Recall@1/5/10 both ways + RSUM over FAISS galleries that are kept (so they can be saved).

    Returns:
        The ``recall_at_k`` dict plus ``index`` ({"i2t": caption-gallery params, "t2i": image-gallery
        params}, each with k and search time) and ``exact``; and the built galleries.
    """
    if len(emb.image_emb) == 0 or len(emb.text_emb) == 0:
        raise PipelineError(f"nothing to evaluate: {len(emb.image_emb)} images, {len(emb.text_emb)} captions")
    check_inputs(emb.image_emb, emb.text_emb, emb.text_image_idx, ks)  # before indexing with them
    n_captions = len(emb.text_emb)
    keep = (np.arange(n_captions) if max_captions_per_image is None
            else truncate_captions(emb.text_image_idx, max_captions_per_image))
    text_emb, text_image_idx = emb.text_emb[keep], emb.text_image_idx[keep]
    built = {
        "text": build_index(text_emb, index_spec(index, *text_emb.shape), gpu=gpu, calibrate=True),
        "image": build_index(emb.image_emb, index_spec(index, *emb.image_emb.shape), gpu=gpu, calibrate=True),
    }
    searches: list[dict[str, Any]] = []

    def backend(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # recall_at_k searches the caption gallery (image->text) first, then the image gallery.
        which = ("text", "image")[len(searches)]
        assert gallery.shape[0] == built[which].index.ntotal
        start = time.perf_counter()
        scores, ids = search(built[which], queries, k)
        seconds = round(time.perf_counter() - start, 3)
        searches.append({**built[which].params, "k": int(k), "search_seconds": seconds})
        return scores, ids

    out: dict[str, Any] = recall_at_k(emb.image_emb, text_emb, text_image_idx, ks, search=backend)
    out.update(n_captions_dropped=int(n_captions - len(keep)), max_captions_per_image=max_captions_per_image,
               index={"i2t": searches[0], "t2i": searches[1]},
               exact=all(s["factory"] == "Flat" for s in searches))
    return out, Galleries(built["image"], built["text"], keep)


# ---- model facts: parameters, speed, device -----------------------------------------------------


def count_parameters(encoder: Teacher) -> dict[str, int]:
    """Students: per tower and total. Other encoders: total over their modules (shared tensors once)."""
    if isinstance(encoder, StudentEncoder):
        return count_params(encoder.model)
    seen = {id(p): p.numel() for m in encoder.modules() for p in m.parameters()}
    return {"total": int(sum(seen.values()))}


def count_flops(encoder: Teacher | None) -> dict[str, int] | None:
    """Forward FLOPs per image and per caption of a student-architecture encoder (a student, or a ``dual:``
    teacher); None for other encoders, whose towers this project cannot count."""
    return flops_per_item(encoder.model) if isinstance(encoder, StudentEncoder) else None


def device_description(device: torch.device, threads: int = 0) -> str:
    """The device in words; on a CPU with its thread count (``threads``, else this process's torch threads)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = threads or torch.get_num_threads()
    return f"cpu ({cpu}, {threads} thread{'s' if threads != 1 else ''})"


@dataclass(frozen=True)
class SpeedSettings:
    """How latency and throughput are measured (recorded with the numbers)."""

    repeats: int = 20  # single-item forward passes; the median is reported
    warmup: int = 3
    batch: int = 64  # throughput batch size
    batch_repeats: int = 3


def _median_seconds(fn: Callable[[], torch.Tensor], repeats: int, warmup: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_speed(encoder: Teacher, image_locations: Sequence[str], captions: Sequence[str],
                  settings: SpeedSettings = SpeedSettings()) -> dict[str, Any]:
    """Encode latency per item (batch 1, median) and throughput (items/s at ``settings.batch``).

    Timed: the model forward on preprocessed inputs already on the device (decoding, resizing and
    tokenising run in loader workers in practice, so they would measure the CPU, not the model).
    Inputs cycle through the given test items so caption lengths are realistic.
    """
    transform, device = encoder.image_transform(), encoder.device
    pixels, failures = [], []
    for loc in image_locations[: settings.batch]:
        try:
            pixels.append(transform(load_rgb(loc)))
        except ImageDecodeError as exc:
            failures.append(str(exc))
    if not pixels or not captions:
        raise PipelineError(f"no decodable test image/caption to time the encoders with ({failures[:1]})")
    batch_px = torch.stack([pixels[i % len(pixels)] for i in range(settings.batch)]).to(device)
    batch_caps = [captions[i % len(captions)] for i in range(settings.batch)]
    one_tok, batch_tok = (to_device(encoder.tokenize(c), device) for c in (batch_caps[:1], batch_caps))

    rep, warm, batch_rep = settings.repeats, settings.warmup, settings.batch_repeats
    img_lat = _median_seconds(partial(encoder.encode_images, batch_px[:1]), rep, warm, device)
    txt_lat = _median_seconds(partial(encoder.encode_texts, one_tok), rep, warm, device)
    img_batch = _median_seconds(partial(encoder.encode_images, batch_px), batch_rep, 1, device)
    txt_batch = _median_seconds(partial(encoder.encode_texts, batch_tok), batch_rep, 1, device)
    return {
        "image_latency_s": img_lat, "text_latency_s": txt_lat,
        "image_throughput": settings.batch / img_batch, "text_throughput": settings.batch / txt_batch,
        "device": device_description(device), **{f"settings_{k}": v for k, v in vars(settings).items()},
    }


# ---- evaluation entry points --------------------------------------------------------------------


def check_cache_matches(cache: FeatureCache, manifest: Manifest) -> None:
    if cache.meta.manifest_hash != manifest.content_hash:
        raise PipelineError(
            f"cache {cache.directory} was built from manifest {cache.meta.manifest_hash}, but the given "
            f"manifest hashes to {manifest.content_hash}; pass the manifest the cache was built from")


def cache_embeddings(cache: FeatureCache) -> SplitEmbeddings:
    """The teacher's cached split as float32, re-normalised: float16 storage leaves norms ~1 +- 5e-4,
    and inner product is only cosine for unit vectors."""
    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    failures = [(r.image_path or r.source_row, r.reason) for r in cache.rejects()]
    return SplitEmbeddings(cache.image_ids, unit(cache.image.to_array()), cache.sample_ids,
                           unit(cache.text.to_array()), cache.text_image_rows(), failures)


def _labels(manifest: Manifest, image_ids: np.ndarray, sample_ids: np.ndarray) -> tuple[list[str], list[str]]:
    """Resolved image locations and caption strings for the given ids."""
    t = manifest.table
    path_of = dict(zip(t.column("image_id").to_pylist(), t.column("image_path").to_pylist()))
    caption_of = dict(zip(t.column("sample_id").to_pylist(), t.column("caption").to_pylist()))
    locations = [manifest.resolve(path_of[int(i)]) for i in image_ids]
    return locations, [caption_of[int(s)] for s in sample_ids]


def _settings(split: str, index: str, max_captions_per_image: int | None, manifest: Manifest,
              **extra: Any) -> dict:
    """What a result depends on besides the model file; a stored result with other settings is stale."""
    return {"split": split, "index": index, "max_captions_per_image": max_captions_per_image,
            "manifest_hash": manifest.content_hash, **extra}


def _record(name: str, kind: str, emb: SplitEmbeddings, metrics: dict, settings: dict,
            **facts: Any) -> dict[str, Any]:
    ks = [k for k in metrics if re.fullmatch(r"(i2t|t2i)_r\d+", k)] + ["rsum"]
    cap = metrics["max_captions_per_image"]
    return {
        "format": RESULT_FORMAT, "name": name, "kind": kind, **facts,
        "metrics": {k: metrics[k] for k in ks},
        "n_images": metrics["n_images"], "n_captions": metrics["n_captions"],
        "n_captions_dropped": metrics["n_captions_dropped"], "max_captions_per_image": cap,
        "captions_policy": "all captions kept" if cap is None else f"first {cap} captions per image",
        "embed_failures": {"count": len(emb.failures), "first": [list(f) for f in emb.failures[:5]]},
        "index": metrics["index"], "exact": metrics["exact"], "settings": settings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# Does an export's recipe read its teacher's targets? Answered by the package that wrote the recipe
# (pipeline.distill.trainer.export_reads_teacher) and passed in: retrieval sits below distill.
ReadsTeacher = Callable[[dict], bool]


def distilled_from(meta: dict, reads_teacher: ReadsTeacher | None = None) -> str | None:
    """The teacher fingerprint a student export learned from, or None: none recorded, or (``reads_teacher``
    says so) a run whose losses never read the teacher's targets (pairs only), for which any teacher's cache
    of its dataset is context. Without ``reads_teacher`` a recorded fingerprint counts."""
    if reads_teacher is not None and not reads_teacher(meta):
        return None
    return meta.get("teacher_fingerprint")


def foreign_export_reason(export_path: str | Path, cache: FeatureCache,
                          reads_teacher: ReadsTeacher | None = None) -> str | None:
    """Why a student export does not belong to ``cache`` (another teacher or dataset), or None if it does."""
    from pipeline.students.export import export_meta

    meta = export_meta(export_path)
    fp, ds = distilled_from(meta, reads_teacher), meta.get("dataset")
    here_fp, here_ds = cache.meta.teacher_fingerprint, cache.meta.dataset
    if (fp and fp != here_fp) or (ds and here_ds and ds != here_ds):
        return f"distilled from teacher {fp} on dataset {ds}; this cache holds teacher {here_fp} on dataset {here_ds}"
    return None


def evaluate_student(
    export_path: str | Path, manifest: Manifest, teacher_cache: FeatureCache | None = None,
    index: str = "exact", *, split: str = "test", max_captions_per_image: int | None = None,
    out_dir: str | Path | None = None, name: str | None = None, device: str = "cpu", batch_size: int = 64,
    workers: int = 2, speed: SpeedSettings | None = SpeedSettings(), gpu: bool | str = "auto",
    reads_teacher: ReadsTeacher | None = None,
) -> dict[str, Any]:
    """Embed ``manifest`` with a student export and compute its retrieval metrics.

    Args:
        export_path: ``export/student.pt`` of a run (``pipeline.students.export_student``).
        manifest: The split to evaluate (e.g. ``test.parquet``).
        teacher_cache: The teacher's cache of the same split: checked against the manifest and the
            student's teacher, and its embeddings of the same ids are saved for the PCA figure.
        index: "exact" (IndexFlatIP), "auto" (``choose_index`` rules) or a FAISS factory string.
        max_captions_per_image: None keeps every caption; N keeps each image's first N.
        out_dir: Write result.json, indexes and embeddings there (see module docstring).
        speed: Latency/throughput settings; None skips the measurement.
        reads_teacher: see :func:`distilled_from`.

    Returns:
        The result record (also ``out_dir/result.json``).
    """
    export_path = Path(export_path)
    encoder = load_student(export_path, device)
    teacher_fp = distilled_from(encoder.meta, reads_teacher)
    if teacher_cache is not None:
        check_cache_matches(teacher_cache, manifest)
        cached_fp = teacher_cache.meta.teacher_fingerprint
        if teacher_fp and teacher_fp != cached_fp:
            raise PipelineError(f"{export_path} was distilled from teacher {teacher_fp}, but the cache "
                                f"{teacher_cache.directory} holds teacher {cached_fp}")
        teacher_fp = cached_fp
    run_dir = paths.run_of_export(export_path)
    name = name or encoder.meta.get("run") or (run_dir.name if run_dir else export_path.stem)
    dataset = encoder.meta.get("dataset") or (teacher_cache.meta.dataset if teacher_cache else None)
    emb = embed_manifest(encoder, manifest, batch_size=batch_size, workers=workers)
    metrics, galleries = retrieval(emb, index, max_captions_per_image, gpu)
    image_locations, captions = _labels(manifest, emb.image_ids, emb.sample_ids)
    settings = student_settings(split, index, max_captions_per_image, manifest, teacher_cache)
    record = _record(
        name, "student", emb, metrics, settings, model_fingerprint=encoder.fingerprint(),
        teacher_fingerprint=teacher_fp, dataset=dataset, split=split, source=str(export_path),
        export_path=str(export_path.resolve()),
        run_dir=str(run_dir.resolve()) if run_dir and (run_dir / "metrics.jsonl").exists() else None,
        student_preset=encoder.model.config.name, params=count_parameters(encoder), flops=count_flops(encoder),
        text_side=encoder.meta.get("text_side"),
        speed=measure_speed(encoder, image_locations, captions, speed) if speed else None,
        speed_onnx=_onnx_speed(export_path, image_locations, captions, speed),
        device=device_description(encoder.device),
    )
    if out_dir is not None:
        teacher = _teacher_arrays(teacher_cache, emb) if teacher_cache is not None else {}
        save_outputs(out_dir, record, emb, galleries, image_locations, captions, teacher)
    return record


def _onnx_speed(export_path: Path, image_locations: Sequence[str], captions: Sequence[str],
                speed: SpeedSettings | None) -> dict[str, Any] | None:
    """The same latency measurement for the export's ONNX graphs under onnxruntime (CPU), when
    ``clipdistill export-onnx`` wrote them; None otherwise."""
    from pipeline.students.onnx import IMAGE_GRAPH, OnnxStudent, onnx_dir

    if not speed or not (onnx_dir(export_path) / IMAGE_GRAPH).is_file():
        return None
    return measure_speed(OnnxStudent.load(export_path, threads=torch.get_num_threads()), image_locations, captions,
                         speed)


def _teacher_arrays(cache: FeatureCache, emb: SplitEmbeddings) -> dict[str, np.ndarray]:
    """The teacher's cached embeddings of the ids the student embedded (those the cache has)."""
    image_ids = emb.image_ids[np.isin(emb.image_ids, cache.image_ids)]
    sample_ids = emb.sample_ids[np.isin(emb.sample_ids, cache.sample_ids)]
    return {"teacher_image_ids": image_ids, "teacher_image_emb": cache.images_by_id(image_ids),
            "teacher_sample_ids": sample_ids, "teacher_text_emb": cache.texts_by_sample_id(sample_ids)}


def _teacher_for_cost(cache: FeatureCache, teacher: Teacher | str | None,
                      device: str) -> tuple[Teacher | None, str | None, str]:
    """The teacher to measure params/latency on: (encoder or None, its spec, a note for the record).

    An explicit teacher must match the cache's fingerprint (else its numbers would describe another
    model). Without one, the offline default ``lit`` teacher is tried when the cache was made by a
    ``lit`` teacher; other backends cannot be rebuilt from the cache's metadata.
    """
    expected, cached_name = cache.meta.teacher_fingerprint, cache.meta.teacher_name
    if teacher is None:
        if cached_name != "lit":
            return None, None, f"teacher {cached_name!r} cannot be rebuilt from a cache; give its spec"
        try:
            candidate = load_teacher("lit", device)
        except PipelineError as exc:
            return None, None, f"default lit teacher not loadable: {exc}"
        if candidate.fingerprint() != expected:
            return None, None, f"default lit teacher is {candidate.fingerprint()}, the cache's is {expected}"
        return candidate, "lit", "default lit teacher"
    spec = teacher if isinstance(teacher, str) else None
    encoder = load_teacher(teacher, device) if isinstance(teacher, str) else teacher.to(device)
    if encoder.fingerprint() != expected:
        raise PipelineError(f"teacher {spec or encoder.name} is {encoder.fingerprint()}, but the cache "
                            f"{cache.directory} was made by {expected}; pass the cache's teacher")
    return encoder, spec, "given teacher"


def evaluate_teacher_cache(
    cache: FeatureCache, manifest: Manifest, index: str = "exact", *, teacher: Teacher | str | None = None,
    split: str = "test", max_captions_per_image: int | None = None, out_dir: str | Path | None = None,
    name: str | None = None, device: str = "cpu", speed: SpeedSettings | None = SpeedSettings(),
    gpu: bool | str = "auto",
) -> dict[str, Any]:
    """Retrieval metrics of the teacher from its stage-1 cache (the teacher is not run for them).

    Args:
        cache: The teacher's cache of the evaluated split; must be built from ``manifest``.
        teacher: A spec (e.g. ``lit:artifacts/teachers/lit-openmoji.pt``) or encoder of the cache's
            teacher, to measure params and latency; None tries the default (see _teacher_for_cost).
        Others: as in :func:`evaluate_student`.
    """
    check_cache_matches(cache, manifest)
    encoder, spec, note = _teacher_for_cost(cache, teacher, device)
    emb = cache_embeddings(cache)
    metrics, galleries = retrieval(emb, index, max_captions_per_image, gpu)
    image_locations, captions = _labels(manifest, emb.image_ids, emb.sample_ids)
    settings = teacher_settings(split, index, max_captions_per_image, manifest,
                                teacher if isinstance(teacher, str) else None)
    record = _record(
        name or f"teacher-{cache.meta.teacher_name}", "teacher", emb, metrics, settings,
        model_fingerprint=cache.meta.teacher_fingerprint, teacher_fingerprint=cache.meta.teacher_fingerprint,
        dataset=cache.meta.dataset, split=split, source=str(cache.directory), teacher_spec=spec,
        cost_note=note,
        params=count_parameters(encoder) if encoder else None, flops=count_flops(encoder),
        speed=measure_speed(encoder, image_locations, captions, speed) if encoder and speed else None,
        device=device_description(encoder.device) if encoder else None,
    )
    if out_dir is not None:
        save_outputs(out_dir, record, emb, galleries, image_locations, captions)
    return record


# ---- outputs -------------------------------------------------------------------------------------


def save_outputs(out_dir: str | Path, record: dict, emb: SplitEmbeddings, galleries: Galleries,
                 image_locations: Sequence[str], captions: Sequence[str],
                 extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write one model's folder (module docstring); the text gallery holds only the kept captions."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULT_FILE).unlink(missing_ok=True)  # the folder is incomplete until it is rewritten
    save_index(galleries.image, out_dir / IMAGE_INDEX)
    save_index(galleries.text, out_dir / TEXT_INDEX)
    keep = galleries.kept_captions
    arrays = {
        "image_ids": emb.image_ids, "image_emb": emb.image_emb.astype(np.float32),
        "image_locations": np.asarray(image_locations, dtype=str),
        "sample_ids": emb.sample_ids[keep], "text_emb": emb.text_emb[keep].astype(np.float32),
        "text_image_idx": emb.text_image_idx[keep], "captions": np.asarray(captions, dtype=str)[keep],
        **(extra or {}),
    }
    with io.atomic_path(out_dir / EMBEDDINGS_FILE) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    files = {"image_index": IMAGE_INDEX, "text_index": TEXT_INDEX, "embeddings": EMBEDDINGS_FILE}
    record = {**record, "files": files}
    io.write_json(out_dir / RESULT_FILE, record)
    return out_dir / RESULT_FILE


def read_result(path: str | Path) -> dict[str, Any]:
    """A stored result record (from its folder or its result.json), with ``eval_dir`` added."""
    path = Path(path)
    file = path / RESULT_FILE if path.is_dir() else path
    if not file.is_file():
        raise PipelineError(f"no evaluation result at {file}; run `clipdistill eval` first")
    try:
        record = json.loads(file.read_text())
    except ValueError as exc:
        raise PipelineError(f"unreadable evaluation result {file}: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != RESULT_FORMAT:
        raise PipelineError(f"{file} is not an evaluation result (expected format {RESULT_FORMAT})")
    return {**record, "eval_dir": str(file.parent)}


def is_fresh(out_dir: str | Path, sources: Sequence[str | Path], settings: dict) -> bool:
    """True when ``out_dir`` holds a complete result newer than every source file, made with ``settings``."""
    out_dir = Path(out_dir)
    files = [out_dir / n for n in (RESULT_FILE, EMBEDDINGS_FILE, IMAGE_INDEX, TEXT_INDEX)]
    if not all(f.is_file() for f in files):
        return False
    try:
        stored = json.loads(files[0].read_text()).get("settings")
    except ValueError:
        return False
    newest = max(Path(s).stat().st_mtime for s in sources)
    return stored == settings and files[0].stat().st_mtime > newest


def student_settings(split: str, index: str, max_captions_per_image: int | None, manifest: Manifest,
                     teacher_cache: FeatureCache | None) -> dict:
    """The settings :func:`evaluate_student` records, for :func:`is_fresh`."""
    return _settings(split, index, max_captions_per_image, manifest,
                     teacher_cache=teacher_cache.meta.teacher_fingerprint if teacher_cache else None)


def teacher_settings(split: str, index: str, max_captions_per_image: int | None, manifest: Manifest,
                     teacher_spec: str | None = None) -> dict:
    """The settings :func:`evaluate_teacher_cache` records, for :func:`is_fresh`."""
    return _settings(split, index, max_captions_per_image, manifest, teacher_spec=teacher_spec)


# ---- querying a saved evaluation (`clipdistill search`) ------------------------------------------


@dataclass
class Hit:
    rank: int
    score: float
    image_id: int
    location: str  # the hit's image (for a caption hit: the image it describes)
    caption: str | None = None  # set for caption hits
    sample_id: int | None = None
    relevant: bool | None = None  # ground truth, when the query is a caption/image of the split


@dataclass
class QueryResult:
    query: str
    kind: str  # "text" (hits are images) or "image" (hits are captions)
    hits: list[Hit]
    embedded_by: str  # "stored" (the query is in the split) or the encoder's name


class EvalIndex:
    """One evaluated model's saved galleries, opened for querying.

    A query that is a caption (exact string) or image (same file) of the evaluated split uses its
    stored embedding; anything else is embedded with the model, loaded on first need (students from
    their export, teachers from the spec recorded at evaluation).
    """

    def __init__(self, directory: str | Path, device: str = "cpu"):
        self.directory = Path(directory)
        self.record = read_result(self.directory)
        self.images = load_index(self.directory / IMAGE_INDEX, gpu=False)
        self.texts = load_index(self.directory / TEXT_INDEX, gpu=False)
        try:
            with np.load(self.directory / EMBEDDINGS_FILE) as data:
                self.data = {k: data[k] for k in ("image_ids", "image_emb", "image_locations", "sample_ids",
                                                  "text_emb", "text_image_idx", "captions")}
        except (OSError, KeyError, ValueError) as exc:
            raise PipelineError(f"unreadable {self.directory / EMBEDDINGS_FILE}: {exc}") from None
        self.device = device
        self._encoder: Teacher | None = None
        self._caption_row = {c: i for i, c in reversed(list(enumerate(self.data["captions"].tolist())))}
        locations = self.data["image_locations"].tolist()
        self._image_row = {str(Path(p).resolve()): i for i, p in enumerate(locations)}

    @property
    def name(self) -> str:
        return self.record["name"]

    def encoder(self) -> Teacher:
        if self._encoder is None:
            if self.record.get("export_path"):
                self._encoder = load_student(self.record["export_path"], self.device)
            elif self.record.get("teacher_spec"):
                self._encoder = load_teacher(self.record["teacher_spec"], self.device)
            else:
                raise PipelineError(f"{self.name}: no model recorded to embed new queries with; query "
                                    "captions or images of the split, or re-run eval with --teacher-spec")
        return self._encoder

    @staticmethod
    def is_image_query(query: str) -> bool:
        return Path(query).suffix.lower() in IMAGE_SUFFIXES or Path(query).is_file()

    def embed(self, query: str) -> tuple[str, np.ndarray, str, int | None]:
        """(kind, unit embedding (1, D), embedded_by, stored row of the query or None)."""
        if self.is_image_query(query):
            row = self._image_row.get(str(Path(query).resolve()))
            if row is not None:
                return "image", self.data["image_emb"][row : row + 1], "stored", row
            if not Path(query).is_file():
                raise PipelineError(f"image query not found: {query}")
            enc = self.encoder()
            try:
                pixels = enc.image_transform()(load_rgb(query))[None]
            except ImageDecodeError as exc:
                raise PipelineError(str(exc)) from None
            return "image", enc.encode_images(pixels).cpu().numpy(), enc.name, None
        if not query.strip():
            raise PipelineError("empty query")
        row = self._caption_row.get(query)
        if row is not None:
            return "text", self.data["text_emb"][row : row + 1], "stored", row
        enc = self.encoder()
        return "text", enc.encode_texts(enc.tokenize([query])).cpu().numpy(), enc.name, None

    def search(self, query: str, k: int = 5) -> QueryResult:
        """Top-``k`` images for a caption, or top-``k`` captions for an image path."""
        kind, vec, by, row = self.embed(query)
        d = self.data
        if kind == "text":
            scores, ids = search(self.images, vec, min(k, self.images.index.ntotal))
            gt = None if row is None else int(d["text_image_idx"][row])
            hits = [Hit(r + 1, float(s), int(d["image_ids"][i]), str(d["image_locations"][i]),
                        relevant=None if gt is None else bool(i == gt))
                    for r, (s, i) in enumerate(zip(scores[0], ids[0])) if i >= 0]
        else:
            scores, ids = search(self.texts, vec, min(k, self.texts.index.ntotal))
            hits = []
            for r, (s, j) in enumerate(zip(scores[0], ids[0])):
                if j < 0:
                    continue
                img = int(d["text_image_idx"][j])
                hits.append(Hit(r + 1, float(s), int(d["image_ids"][img]), str(d["image_locations"][img]),
                                caption=str(d["captions"][j]), sample_id=int(d["sample_ids"][j]),
                                relevant=None if row is None else bool(img == row)))
        return QueryResult(query, kind, hits, by)
