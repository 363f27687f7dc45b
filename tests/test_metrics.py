"""Retrieval metrics (method.md section 2) and the FAISS backend, against hand-computed answers and the
loop-based reference ``brute_force_recall``."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from pipeline.common.errors import PipelineError
from pipeline.retrieval.index import (
    IndexSpec,
    build_index,
    choose_index,
    gpu_available,
    knn_recall,
    load_index,
    save_index,
    search,
)
from pipeline.retrieval.metrics import brute_force_recall, recall_at_k, truncate_captions

E = np.eye(4, dtype=np.float32)


def retrieval_metrics(image_emb, text_emb, idx, index_spec: str = "auto", *, ks=(1, 5, 10),
                      max_captions_per_image=None) -> dict:
    """Stage 3's evaluation path (``pipeline.retrieval.evaluate.retrieval``) on bare arrays."""
    from pipeline.features.encode import SplitEmbeddings
    from pipeline.retrieval.evaluate import retrieval

    emb = SplitEmbeddings(np.arange(len(image_emb)), image_emb, np.arange(len(text_emb)), text_emb, np.asarray(idx), [])
    return retrieval(emb, index_spec, max_captions_per_image, gpu=False, ks=ks)[0]


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """The CI machine is small and shared; OpenMP threads spinning on busy cores slow FAISS down."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(*rows: list[float]) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recalls(result: dict) -> dict:
    """Only the score entries of a result dict."""
    return {k: v for k, v in result.items() if k.startswith(("i2t_r", "t2i_r")) or k == "rsum"}


def all_paths(image_emb, text_emb, idx, ks, **kw) -> list[dict]:
    """The same evaluation through both search backends: FAISS (exact by default) and numpy."""
    return [
        recalls(retrieval_metrics(image_emb, text_emb, idx, ks=ks, **kw)),
        recalls(recall_at_k(image_emb, text_emb, idx, ks, **kw)),
    ]


def renorm(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_problem(seed: int, n_images: int, dim: int, max_caps: int = 7):
    """Captions are noisy copies of their image, so recalls are neither 0 nor 100."""
    noise = 0.4 * np.sqrt(dim)  # caption-image cosine ~ 2.5 standard deviations of a random pair
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_images, dim)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    idx = np.repeat(np.arange(n_images), rng.integers(1, max_caps + 1, size=n_images))
    rng.shuffle(idx)
    text = images[idx] + noise * rng.standard_normal((len(idx), dim)).astype(np.float32) / np.sqrt(dim)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return images, text.astype(np.float32), idx


# ---- hand-built cases ----------------------------------------------------------------------------


def test_hand_built_case_with_multi_caption_image_and_all_zero_tie():
    images = E[:3]
    text = np.stack([E[0], unit([2, 1, 0, 0])[0], unit([3, 2, 1, 0])[0], E[3]])
    idx = np.array([0, 1, 2, 2])
    # t2i scores (I0, I1, I2): c0 (1,0,0) rank 0; c1 (.89,.45,0) rank 1; c2 ∝ (3,2,1) rank 2;
    # c3 (0,0,0) -> tied with both other images -> rank 2 (ties count against the query).
    # i2t: I0 best GT c0 = 1 -> rank 0; I1 GT c1 = .45 < c2 = .53 -> rank 1;
    # I2 GT {c2 = .27, c3 = 0}: best .27 beats negatives c0, c1 (0) -> rank 0.
    expected = {
        "i2t_r1": 100 * 2 / 3, "i2t_r2": 100.0, "i2t_r3": 100.0,
        "t2i_r1": 25.0, "t2i_r2": 50.0, "t2i_r3": 100.0,
    }
    expected["rsum"] = sum(expected.values())
    for got in [*all_paths(images, text, idx, (1, 2, 3)), brute_force_recall(images, text, idx, (1, 2, 3))]:
        assert got == pytest.approx(expected)


@pytest.mark.parametrize("truncate", [None, 5])
def test_image_with_more_than_five_captions(truncate):
    images = E[:2]
    # Image 0 has 7 captions: six weak ones (c0..c5) and its best one last (c6 = e0).
    # Image 1's only caption c7 sits exactly between the two images (an exact tie for t2i).
    weak = unit([1, 2, 0, 0])[0]  # scores (.45, .89)
    text = np.stack([weak] * 6 + [E[0], unit([1, 1, 0, 0])[0]])
    idx = np.array([0] * 7 + [1])
    if truncate is None:
        # i2t: I0 best GT c6 = 1 -> rank 0; I1 GT c7 = .71, six weak captions score .89 -> rank 6.
        # t2i: c0..c5 rank 1, c6 rank 0, c7 tied .71/.71 -> rank 1.
        expected = dict(i2t_r1=50.0, i2t_r5=50.0, i2t_r10=100.0, t2i_r1=12.5, t2i_r5=100.0, t2i_r10=100.0)
    else:
        # Keeps c0..c4 and c7. i2t: I0 best GT .45 < c7 .71 -> rank 1; I1: five weak captions -> rank 5.
        # t2i: c0..c4 rank 1, c7 rank 1.
        expected = dict(i2t_r1=0.0, i2t_r5=50.0, i2t_r10=100.0, t2i_r1=0.0, t2i_r5=100.0, t2i_r10=100.0)
    expected["rsum"] = sum(expected.values())
    keep = truncate_captions(idx, truncate) if truncate else np.arange(len(idx))
    reference = brute_force_recall(images, text[keep], idx[keep])
    for got in [*all_paths(images, text, idx, (1, 5, 10), max_captions_per_image=truncate), reference]:
        assert got == pytest.approx(expected)
    full = retrieval_metrics(images, text, idx, max_captions_per_image=truncate)
    assert full["n_captions"] == (8 if truncate is None else 6)
    assert full["n_captions_dropped"] == (0 if truncate is None else 2)


def test_collapsed_embeddings_score_zero_not_hundred():
    """Every score equal: pessimistic ties make every query a miss once enough negatives tie."""
    rng = np.random.default_rng(0)
    v = rng.standard_normal(16).astype(np.float32)
    v /= np.linalg.norm(v)
    images, text = np.tile(v, (50, 1)), np.tile(v, (250, 1))
    idx = np.repeat(np.arange(50), 5)
    for got in [*all_paths(images, text, idx, (1, 5, 10)), brute_force_recall(images, text, idx)]:
        assert got["rsum"] == 0.0


def test_truncate_captions_keeps_first_n_per_image_in_order():
    idx = np.array([2, 0, 2, 2, 1, 0, 2, 0, 0, 0, 0, 0])
    kept = truncate_captions(idx, 2)
    assert kept.tolist() == [0, 1, 2, 4, 5]
    for n in (1, 3, 100):
        kept = truncate_captions(idx, n)
        ref = [j for j in range(len(idx)) if np.sum(idx[:j] == idx[j]) < n]
        assert kept.tolist() == ref


# ---- fast paths == reference -------------------------------------------------------------------


@pytest.mark.parametrize("seed,n_images,dim", [(0, 20, 8), (1, 150, 32), (2, 400, 64), (3, 60, 4)])
def test_faiss_exact_equals_reference_on_random_data(seed, n_images, dim):
    images, text, idx = random_problem(seed, n_images, dim)
    ref = brute_force_recall(images, text, idx)
    assert 0 < ref["rsum"] < 600  # the case is not degenerate
    for got in all_paths(images, text, idx, (1, 5, 10)):
        assert got == ref


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_equals_reference_with_many_exact_ties(seed):
    """Entries +-1/4 in 16 dims: unit norm, every score a multiple of 1/16 computed exactly in float32
    whatever the summation order, so ties are frequent and identical in every path. With 60 captions
    per query list cut at max(ks) + max captions, this exercises ties at the cut-off."""
    rng = np.random.default_rng(seed)
    images = (rng.choice([-0.25, 0.25], size=(40, 16))).astype(np.float32)
    idx = np.repeat(np.arange(40), rng.integers(1, 8, size=40))
    text = np.where(rng.random((len(idx), 16)) < 0.3, -images[idx], images[idx]).astype(np.float32)
    ks = (1, 3, 5, 10)
    ref = brute_force_recall(images, text, idx, ks)
    for got in all_paths(images, text, idx, ks):
        assert got == ref


@pytest.mark.parametrize("seed", [0, 1])
def test_truncated_path_equals_reference_on_truncated_inputs(seed):
    images, text, idx = random_problem(seed, 100, 16, max_caps=9)
    keep = truncate_captions(idx, 5)
    ref = brute_force_recall(images, text[keep], idx[keep])
    for got in all_paths(images, text, idx, (1, 5, 10), max_captions_per_image=5):
        assert got == ref


# ---- approximate indexes -----------------------------------------------------------------------


def clustered(seed: int, n: int, dim: int, n_clusters: int, spread: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim))
    x = centers[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    "make_spec,min_recall",
    [
        (lambda: IndexSpec("IVF64,Flat", nprobe=4), 0.8),
        (lambda: choose_index(3000, 32, factory="HNSW16,Flat"), 0.9),
        (lambda: choose_index(3000, 32, memory_budget_bytes=3000 * 16), 0.4),  # rule 4: 8-byte PQ codes
    ],
)
def test_approximate_index_recall_relative_to_exact(make_spec, min_recall):
    gallery = clustered(0, 3000, 32, n_clusters=30)
    rng = np.random.default_rng(1)
    queries = renorm(gallery[rng.choice(3000, 300, replace=False)] + 0.2 * rng.standard_normal((300, 32)))
    spec = make_spec()
    assert not spec.exact
    exact = build_index(gallery, choose_index(len(gallery), 32))
    approx = build_index(gallery, spec)
    assert exact.spec.factory == "Flat" and approx.params["factory"] == spec.factory
    _, exact_ids = search(exact, queries, 10)
    _, approx_ids = search(approx, queries, 10)
    r = knn_recall(approx_ids, exact_ids, 10)
    assert knn_recall(exact_ids, exact_ids, 10) == 1.0
    assert min_recall <= r <= 1.0, r
    # A random "index" overlaps ~ 10 / 3000, so the thresholds above are meaningful.
    assert knn_recall(rng.integers(0, 3000, exact_ids.shape), exact_ids, 10) < 0.05


def test_calibrated_nprobe_is_the_smallest_reaching_the_target_on_fresh_queries():
    from pipeline.retrieval.index import CALIBRATION_RECALL

    gallery = clustered(4, 20000, 32, n_clusters=200)
    static = build_index(gallery, IndexSpec("IVF256,Flat", nprobe=256))  # every list: exact
    tuned = build_index(gallery, IndexSpec("IVF256,Flat", nprobe=256), calibrate=True)
    nprobe = tuned.params["nprobe"]
    cal = tuned.params["calibration"]
    assert static.params["nprobe"] == 256 and "calibration" not in static.params
    assert nprobe < 256 and nprobe & (nprobe - 1) == 0 and tuned.spec.nprobe == nprobe
    assert cal["sample_recall_at_10"] >= CALIBRATION_RECALL
    rng = np.random.default_rng(9)  # queries the calibration never saw
    queries = renorm(gallery[rng.choice(20000, 300, replace=False)] + 0.6 * rng.standard_normal((300, 32)) / 32**0.5)
    _, exact_ids = search(static, queries, 10)
    assert knn_recall(search(tuned, queries, 10)[1], exact_ids, 10) >= 0.95
    # the next smaller nprobe misses the target on the calibration sample (so the choice is the smallest)
    if nprobe > 1:
        from pipeline.retrieval.index import CALIBRATION_QUERIES, calibration_queries

        q = calibration_queries(gallery, CALIBRATION_QUERIES)
        faiss_params = __import__("faiss").ParameterSpace()
        faiss_params.set_index_parameter(tuned.index, "nprobe", nprobe // 2)
        assert knn_recall(tuned.index.search(q, 10)[1], search(static, q, 10)[1], 10) < CALIBRATION_RECALL


def test_approximate_retrieval_metrics_close_to_exact():
    images = clustered(2, 3000, 32, n_clusters=40)
    rng = np.random.default_rng(3)
    idx = np.repeat(np.arange(3000), 2)
    text = images[idx] + 0.15 * rng.standard_normal((len(idx), 32)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    exact = retrieval_metrics(images, text, idx)
    approx = retrieval_metrics(images, text, idx, index_spec="HNSW16,Flat")
    assert exact["exact"] and not approx["exact"]
    assert exact["index"]["i2t"]["n_vectors"] == 6000 and exact["index"]["t2i"]["n_vectors"] == 3000
    assert approx["index"]["t2i"]["factory"] == "HNSW16,Flat"
    assert 5 < exact["t2i_r1"] < 95
    for key in ("i2t_r10", "t2i_r10"):
        assert abs(approx[key] - exact[key]) < 3.0, (key, approx[key], exact[key])


# ---- index choice, save / load, GPU switch ------------------------------------------------------


def test_choose_index_rules():
    assert choose_index(25_000, 512).factory == "Flat"
    assert choose_index(300_000, 512).factory.startswith("HNSW")
    ivf = choose_index(1_000_000, 512)
    assert ivf.factory == "IVF4096,Flat" and ivf.nprobe == 64
    pq = choose_index(10_000_000, 512, memory_budget_bytes=1_000_000_000)
    assert pq.factory == "IVF16384,PQ64"
    assert choose_index(3000, 32, memory_budget_bytes=3000 * 16).factory == "IVF256,PQ8"
    assert choose_index(1000, 64, memory_budget_bytes=1000 * 64).factory != "Flat"  # Flat needs 4x that
    assert choose_index(1000, 64, exact_max_vectors=0).factory.startswith("HNSW")
    spec = choose_index(10, 8, factory="IVF4,Flat")
    assert spec.factory == "IVF4,Flat" and spec.nprobe == 4 and spec.reason == "explicit factory string"
    assert choose_index(10, 8, factory="IVF4096,Flat").nprobe == 64
    with pytest.raises(PipelineError, match="factory"):
        choose_index(10, 8, factory="IVFbanana")
    with pytest.raises(PipelineError, match="fits"):
        choose_index(10**9, 512, memory_budget_bytes=10**9)


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW8,Flat"])
def test_save_load_round_trip(tmp_path, factory):
    gallery = clustered(4, 2000, 16, n_clusters=20)
    built = build_index(gallery, choose_index(2000, 16, factory=factory))
    path = tmp_path / "sub" / "images.faiss"
    save_index(built, path)
    sidecar = json.loads((tmp_path / "sub" / "images.faiss.json").read_text())
    assert sidecar["spec"] == built.spec.to_dict() and sidecar["params"]["n_vectors"] == 2000
    loaded = load_index(path, gpu=False)
    assert loaded.spec == built.spec
    s0, i0 = search(built, gallery[:50], 7)
    s1, i1 = search(loaded, gallery[:50], 7)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_array_equal(s0, s1)
    (tmp_path / "sub" / "images.faiss.json").unlink()
    with pytest.raises(PipelineError, match="missing"):
        load_index(path)


def test_gpu_required_but_unavailable():
    if gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(PipelineError, match="GPU"):
        build_index(E[:2], IndexSpec("Flat"), gpu=True)


# ---- bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda im, tx, ix: (im, renorm(tx[:, :8]), ix), "width"),
        (lambda im, tx, ix: (im, tx, ix[:-1]), "one entry per caption"),
        (lambda im, tx, ix: (im, tx, np.where(ix == 0, len(im), ix)), "not a valid image row"),
        (lambda im, tx, ix: (im, tx, np.where(ix == 0, -1, ix)), "not a valid image row"),
        (lambda im, tx, ix: (im, tx, ix.astype(np.float64)), "integer"),
        (lambda im, tx, ix: (im, tx, np.where(ix == 3, 4, ix)), "no caption"),
        (lambda im, tx, ix: (im * 3, tx, ix), "not L2-normalised"),
        (lambda im, tx, ix: (im, np.where(np.arange(tx.size).reshape(tx.shape) == 5, np.nan, tx), ix),
         "non-finite"),
        (lambda im, tx, ix: (im, tx.astype(np.int64), ix), "floats"),
        (lambda im, tx, ix: (im[0], tx, ix), "2-D"),
    ],
)
def test_bad_inputs_raise_pipeline_error(change, match):
    images, text, idx = random_problem(0, 10, 16, max_caps=3)
    bad = change(images, text, idx)
    for fn in (retrieval_metrics, recall_at_k, brute_force_recall):
        with pytest.raises(PipelineError, match=match):
            fn(*bad)


def test_bad_ks_and_query_width():
    images, text, idx = random_problem(0, 10, 16)
    with pytest.raises(PipelineError, match="ks"):
        retrieval_metrics(images, text, idx, ks=(0, 5))
    built = build_index(images, IndexSpec("Flat"))
    with pytest.raises(PipelineError, match="width"):
        search(built, renorm(text[:, :8]), 5)
