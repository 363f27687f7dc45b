"""FAISS search backend for retrieval evaluation: index choice, build, search, save/load.

All vectors are float32 and L2-normalised and the metric is inner product (= cosine).
:func:`choose_index` holds every rule for picking an index in one place; the chosen
:class:`IndexSpec` and the facts of the build (``BuiltIndex.params``) are plain dicts meant to be
stored next to the results they produced. :func:`pipeline.retrieval.evaluate.retrieval` is the evaluation entry point.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common import io
from pipeline.common.errors import PipelineError
from pipeline.retrieval.metrics import check_embeddings


class _LazyFaiss:
    """``faiss``, imported at first use (building, searching, saving or loading an index): what never searches (a
    classification sweep, the runner's tables) runs without it. Neither build installed (they are extras, one of
    the two) is one line."""

    def __getattr__(self, name: str):
        try:
            import faiss as module
        except ImportError:
            raise PipelineError("FAISS is not installed: pip install '.[cpu]' (or '.[gpu]' on a CUDA machine); "
                                "make install installs the cpu one") from None
        return getattr(module, name)


faiss = _LazyFaiss()

# ---- index-choice rules (read with choose_index) ----------------------------------------------
# Up to this many vectors search is exact. Every standard benchmark (Flickr30k 5K captions, COCO
# 25K captions) is far below it, so published-protocol numbers never depend on an approximation.
EXACT_MAX_VECTORS = 100_000
# HNSW needs no training and has the best recall/speed trade-off, but its graph build is
# O(n log n) with a large constant and it has no GPU implementation: use it up to here.
HNSW_MAX_VECTORS = 500_000
HNSW_M = 32  # graph degree; memory per vector is about 4 * dim + 8 * M bytes
HNSW_EF_SEARCH = 128
# IVF: nlist ~ 4 sqrt(n) lists, rounded to a power of two (FAISS's guideline is 4-16 sqrt(n); the
# low end because k-means training cost grows with nlist^2: sample ~ nlist, distances to nlist
# centroids). Scanning the lists is memory-bound, so IVF only beats exact batched (BLAS) search
# when it reads a small fraction of the gallery: ~1.5% here.
IVF_LISTS_PER_SQRT_N = 4
IVF_PROBE_FRACTION = 64  # nprobe = nlist / 64 before calibration (and for indexes built without it)
IVF_MIN_NPROBE = 16
# nprobe calibration (build_index(calibrate=True), what stage 3 does): the smallest power of two whose
# k-recall@10 against exact search reaches CALIBRATION_RECALL on CALIBRATION_QUERIES queries made from the
# gallery itself (a gallery vector plus noise, cosine ~0.9 to it), so no query set, and no test query, is used.
# The target sits above the 0.95 goal to leave room for the sample's noise.
CALIBRATION_RECALL = 0.97
CALIBRATION_QUERIES = 256
CALIBRATION_K = 10
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39 per centroid and samples down above 256
PQ_CENTROIDS = 256  # 8-bit PQ codes: each sub-quantizer is a 256-centroid k-means
PQ_SUBQUANTIZERS = (64, 32, 16, 8)  # code bytes per vector, most accurate first
ID_BYTES = 8  # IVF lists store an int64 id per vector
GPU_MAX_K = 2048  # FAISS GPU k-selection limit; longer neighbour lists are searched on CPU


@dataclass(frozen=True)
class IndexSpec:
    """What index to build and how to search it.

    Attributes:
        factory: FAISS ``index_factory`` string ("Flat", "IVF1024,Flat", "HNSW32,Flat", ...).
        nprobe: IVF lists visited per query (None for non-IVF indexes).
        ef_search: HNSW candidate-list size (None for non-HNSW indexes).
        reason: Which rule chose it (for the results record).
    """

    factory: str
    nprobe: int | None = None
    ef_search: int | None = None
    reason: str = ""

    @property
    def exact(self) -> bool:
        return self.factory == "Flat"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexSpec:
        return cls(d["factory"], d.get("nprobe"), d.get("ef_search"), d.get("reason", ""))


def _faiss_message(e: RuntimeError) -> str:
    """The useful last part of a FAISS C++ exception ("Error in <signature> at <file:line>: <message>")."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown FAISS error"
    m = re.search(r" at \S+:\d+: (.*)$", text)
    return m.group(1) if m else text


def _pow2(x: float) -> int:
    return 2 ** max(0, round(math.log2(max(x, 1.0))))


def _nlist(factory: str) -> int | None:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else None


def _default_search_params(factory: str) -> tuple[int | None, int | None]:
    """(nprobe, ef_search) defaults for a factory string."""
    nlist = _nlist(factory)
    nprobe = min(nlist, max(IVF_MIN_NPROBE, nlist // IVF_PROBE_FRACTION)) if nlist else None
    ef_search = HNSW_EF_SEARCH if "HNSW" in factory else None
    return nprobe, ef_search


def choose_index(
    n_vectors: int,
    dim: int,
    memory_budget_bytes: int | None = None,
    *,
    factory: str | None = None,
    exact_max_vectors: int = EXACT_MAX_VECTORS,
) -> IndexSpec:
    """Pick an index for a gallery of ``n_vectors`` vectors of width ``dim``.

    Rules, first match wins (memory = bytes the index holds; budget None = unlimited, so the choice
    depends on the size only and is the same on every machine):
        0. ``factory`` given                              -> that FAISS factory string, as is.
        1. n <= exact_max_vectors and 4*dim*n fits       -> "Flat" (exact).
        2. n <= HNSW_MAX_VECTORS and (4*dim + 8*M)*n fits -> "HNSW{M},Flat".
        3. (4*dim + 8)*n fits                            -> "IVF{nlist},Flat", nlist ~ 4 sqrt(n).
        4. otherwise                                     -> "IVF{nlist},PQ{m}" with the largest m
           (code bytes) dividing dim for which (m + 8)*n fits; PipelineError if even m = 8 does not.

    Args:
        n_vectors: Gallery size.
        dim: Vector width.
        memory_budget_bytes: Upper bound on index memory; None for no bound.
        factory: Explicit FAISS ``index_factory`` string, bypassing rules 1-4.
        exact_max_vectors: Size limit of rule 1 (0 forces an approximate index, e.g. for benchmarks).
    """
    if n_vectors < 1 or dim < 1:
        raise PipelineError(f"cannot index {n_vectors} vectors of width {dim}")
    budget = math.inf if memory_budget_bytes is None else memory_budget_bytes

    def fits(bytes_per_vector: int) -> bool:
        return bytes_per_vector * n_vectors <= budget

    if factory is not None:
        try:
            faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise PipelineError(f"invalid FAISS index factory {factory!r}: {_faiss_message(e)}") from None
        nprobe, ef = _default_search_params(factory)
        return IndexSpec(factory, nprobe, ef, reason="explicit factory string")

    if n_vectors <= exact_max_vectors and fits(4 * dim):
        return IndexSpec("Flat", reason=f"exact: n <= {exact_max_vectors}")
    if n_vectors <= HNSW_MAX_VECTORS and fits(4 * dim + 8 * HNSW_M):
        return IndexSpec(
            f"HNSW{HNSW_M},Flat", ef_search=HNSW_EF_SEARCH, reason=f"graph: n <= {HNSW_MAX_VECTORS}"
        )
    nlist = _pow2(IVF_LISTS_PER_SQRT_N * math.sqrt(n_vectors))
    nprobe, _ = _default_search_params(f"IVF{nlist}")
    if fits(4 * dim + ID_BYTES):
        return IndexSpec(f"IVF{nlist},Flat", nprobe=nprobe, reason="inverted lists: raw vectors fit")
    for m in PQ_SUBQUANTIZERS:
        if dim % m == 0 and fits(m + ID_BYTES):
            return IndexSpec(
                f"IVF{nlist},PQ{m}", nprobe=nprobe, reason=f"compressed: raw vectors exceed {budget:.3g} B"
            )
    raise PipelineError(
        f"no index for {n_vectors} vectors of width {dim} fits in {budget:.3g} bytes; "
        "raise the memory budget or pass an explicit index factory string"
    )


# ---- build / search / save / load -------------------------------------------------------------


@dataclass
class BuiltIndex:
    """A FAISS index ready to search, with the spec and build facts to record next to results."""

    index: Any
    spec: IndexSpec
    params: dict[str, Any]
    on_gpu: bool = False
    gpu_resources: Any = field(default=None, repr=False)  # must outlive the GPU index


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _to_gpu(index: Any, spec: IndexSpec, gpu: bool | str) -> tuple[Any, Any, bool]:
    """Move ``index`` to GPU 0 when asked/possible; returns (index, resources, on_gpu)."""
    if gpu not in (True, False, "auto"):
        raise PipelineError(f"gpu must be True, False or 'auto', got {gpu!r}")
    if gpu is False or (gpu == "auto" and not gpu_available()):
        return index, None, False
    if not gpu_available():
        raise PipelineError("GPU search requested, but FAISS has no GPU support here (install faiss-gpu)")
    try:
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, 0, index), resources, True
    except RuntimeError as e:  # e.g. HNSW has no GPU implementation
        if gpu == "auto":
            return index, None, False
        raise PipelineError(f"index {spec.factory!r} cannot run on GPU: {_faiss_message(e)}") from None


def _skip_polysemous_training(index: Any) -> None:
    """FAISS trains PQ codes for Hamming-distance filtering by default: minutes of annealing, useless
    for inner-product search."""
    for candidate in (index, faiss.try_extract_index_ivf(index)):
        if candidate is not None:
            candidate = faiss.downcast_index(candidate)
            if hasattr(candidate, "do_polysemous_training"):
                candidate.do_polysemous_training = False


def _apply_search_params(built: BuiltIndex) -> None:
    space = faiss.GpuParameterSpace() if built.on_gpu else faiss.ParameterSpace()
    if built.spec.nprobe is not None:
        space.set_index_parameter(built.index, "nprobe", built.spec.nprobe)
    if built.spec.ef_search is not None:
        space.set_index_parameter(built.index, "efSearch", built.spec.ef_search)


def build_index(vectors: np.ndarray, spec: IndexSpec, gpu: bool | str = "auto", seed: int = 0,
                calibrate: bool = False) -> BuiltIndex:
    """Build (train if needed, add) an inner-product index over L2-normalised ``vectors``.

    Args:
        vectors: (n, dim) gallery.
        spec: From :func:`choose_index`.
        gpu: "auto" = GPU FAISS when available and the index type supports it; True = require it.
        seed: Seed of the training sample (IVF/PQ).
        calibrate: IVF only: replace the spec's nprobe by the calibrated one (``calibrate_nprobe``).
    """
    vectors = check_embeddings(vectors, "gallery vectors")
    n, dim = vectors.shape
    start = time.perf_counter()
    try:
        index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise PipelineError(f"invalid FAISS index factory {spec.factory!r}: {_faiss_message(e)}") from None
    index, resources, on_gpu = _to_gpu(index, spec, gpu)

    train_size = 0
    if not index.is_trained:
        _skip_polysemous_training(index)
        nlist = _nlist(spec.factory) or 1
        want = TRAIN_POINTS_PER_LIST * max(nlist, PQ_CENTROIDS if "PQ" in spec.factory else 1)
        train_size = min(n, want)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=train_size, replace=False))
        index.train(vectors[rows])
    index.add(vectors)

    params = {
        **spec.to_dict(),
        "metric": "inner_product",
        "n_vectors": int(n),
        "dim": int(dim),
        "train_size": int(train_size),
        "train_seed": int(seed),
        "on_gpu": on_gpu,
        "faiss_version": faiss.__version__,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    built = BuiltIndex(index, spec, params, on_gpu, resources)
    _apply_search_params(built)
    if calibrate and spec.nprobe is not None:
        calibrate_nprobe(built, vectors, seed)
    return built


def calibration_queries(gallery: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` queries near random gallery vectors (added noise of norm ~0.5: cosine ~0.9 to the source)."""
    rng = np.random.default_rng([seed, 7])
    rows = rng.choice(len(gallery), size=min(n, len(gallery)), replace=False)
    d = gallery.shape[1]
    q = gallery[rows] + rng.standard_normal((len(rows), d)).astype(np.float32) * (0.5 / d**0.5)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def calibrate_nprobe(built: BuiltIndex, gallery: np.ndarray, seed: int = 0) -> int:
    """Set the IVF index's nprobe to the smallest power of two reaching ``CALIBRATION_RECALL`` (constants above);
    records the value, the sample's recall and the rule in ``built.params``. Returns the chosen nprobe."""
    nlist = _nlist(built.spec.factory) or 1
    queries = calibration_queries(gallery, CALIBRATION_QUERIES, seed)
    k = min(CALIBRATION_K, len(gallery))
    _, exact = faiss.knn(queries, np.ascontiguousarray(gallery, dtype=np.float32), k, faiss.METRIC_INNER_PRODUCT)
    space = faiss.GpuParameterSpace() if built.on_gpu else faiss.ParameterSpace()
    nprobe, recall = 1, 0.0
    while True:
        space.set_index_parameter(built.index, "nprobe", nprobe)
        recall = knn_recall(built.index.search(queries, k)[1], exact, k)
        if recall >= CALIBRATION_RECALL or nprobe >= nlist:
            break
        nprobe = min(nlist, nprobe * 2)
    built.spec = replace(built.spec, nprobe=nprobe, reason=built.spec.reason + "; nprobe calibrated")
    built.params.update(nprobe=nprobe, calibration={
        "target_recall_at_10": CALIBRATION_RECALL, "sample_recall_at_10": round(recall, 4),
        "queries": len(queries), "rule": "smallest power-of-two nprobe reaching the target on gallery-noise queries"})
    return nprobe


def search(built: BuiltIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` neighbours of each query: (scores, ids), both (n_queries, k), best first.

    Slots beyond the gallery size (or not reached by an approximate index) have id -1.
    """
    queries = check_embeddings(queries, "queries")
    if queries.shape[1] != built.index.d:
        raise PipelineError(f"queries have width {queries.shape[1]}, the index holds width {built.index.d}")
    if k < 1 or (built.on_gpu and k > GPU_MAX_K):
        raise PipelineError(f"k must be in 1..{GPU_MAX_K if built.on_gpu else 'n'}, got {k}")
    scores, ids = built.index.search(queries, k)
    return scores, ids


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def save_index(built: BuiltIndex, path: str | Path) -> None:
    """Write the index (``faiss.write_index``) and a JSON sidecar ``<path>.json`` with spec + params.

    Both files are written to temporary names first, so a crash never leaves a half-written pair. The index gets a
    ``.blake2b`` checksum like every stored file, and the sidecar records it too: a sidecar and an index from two
    different writers do not pass as a pair.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_index = faiss.index_gpu_to_cpu(built.index) if built.on_gpu else built.index
    with io.atomic_path(path, checksum=True) as tmp:
        faiss.write_index(cpu_index, str(tmp))
    digest = io.checksum_path(path).read_text().strip()  # as just recorded (not hashed twice)
    io.write_json(_sidecar(path), {"spec": built.spec.to_dict(), "params": built.params, "checksum": digest})


def load_index(path: str | Path, gpu: bool | str = "auto") -> BuiltIndex:
    """Read an index written by :func:`save_index` (needs both the index file and its sidecar)."""
    path = Path(path)
    for p in (path, _sidecar(path)):
        if not p.is_file():
            raise PipelineError(f"index file missing: {p}")
    try:
        meta = json.loads(_sidecar(path).read_text())
        spec = IndexSpec.from_dict(meta["spec"])
        params = dict(meta["params"])
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"unreadable index sidecar {_sidecar(path)}: {e}") from None
    io.verify_file(path, "FAISS index")
    recorded, sums = meta.get("checksum"), io.checksum_path(path)
    if recorded and sums.is_file() and sums.read_text().strip() != recorded:
        raise PipelineError(f"{_sidecar(path)} describes another index than {path} (two writers?); rebuild it")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError:
        raise PipelineError(f"unreadable FAISS index file: {path}") from None
    index, resources, on_gpu = _to_gpu(index, spec, gpu)
    built = BuiltIndex(index, spec, {**params, "on_gpu": on_gpu}, on_gpu, resources)
    _apply_search_params(built)
    return built


def knn_recall(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean fraction of each query's exact top-``k`` ids found in its approximate top-``k`` ("k-recall@k")."""
    a, e = np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k]
    hits = sum(len(np.intersect1d(ai[ai >= 0], ei)) for ai, ei in zip(a, e))
    return float(hits / e.size)


# ---- evaluation entry point -------------------------------------------------------------------


