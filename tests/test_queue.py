"""NegativeQueue (method.md 1.1): FIFO ring vs a naive list, persistence, device copy, empty slots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.common.errors import PipelineError
from pipeline.distill.losses import ContrastiveDistillLoss
from pipeline.distill.queue import NegativeQueue, QueueBatch, _Ring

torch.set_num_threads(1)
D = 4


class NaiveFifo:
    """Reference: a Python list that keeps the last K rows, oldest first."""

    def __init__(self, k):
        self.k, self.rows = k, []

    def push(self, emb, ids, hsh=None):
        for i in range(len(emb)):
            self.rows.append((list(map(float, emb[i])), int(ids[i]), None if hsh is None else int(hsh[i])))
        self.rows = self.rows[-self.k:]


def rows(n, start, seed=None):
    g = np.random.default_rng(start if seed is None else seed)
    emb = g.standard_normal((n, D)).astype(np.float32)
    ids = np.arange(start, start + n, dtype=np.int64)
    return emb, ids, ids * 1000 + 7


def assert_same_as_naive(q, naive_img, naive_txt):
    for m, naive in (("img", naive_img), ("txt", naive_txt)):
        c = q.contents(m)
        assert q.fill[m] == len(naive.rows)
        want = np.array([r[0] for r in naive.rows], dtype=np.float32).reshape(-1, D)
        np.testing.assert_array_equal(c["emb"], want)
        np.testing.assert_array_equal(c["ids"], [r[1] for r in naive.rows])
        if m == "txt" and "hash" in c:
            np.testing.assert_array_equal(c["hash"], [r[2] for r in naive.rows])


def assert_device_equals_memmap(q):
    a = q.active("cpu")
    for m, emb, ids in (("img", a.img, a.img_ids), ("txt", a.txt, a.txt_ids)):
        r = q.rings[m]
        np.testing.assert_array_equal(emb.numpy(), np.asarray(r.emb[: r.fill]))
        np.testing.assert_array_equal(ids.numpy(), np.asarray(r.ids[: r.fill]))
    if q.with_hash:
        np.testing.assert_array_equal(a.txt_hash.numpy(), np.asarray(q.rings["txt"].hash[: q.fill["txt"]]))


def test_fifo_wraps_like_naive_list(tmp_path):
    k = 7
    q = NegativeQueue.create(tmp_path / "q", size=k, dim=D, with_hash=True)
    ni, nt = NaiveFifo(k), NaiveFifo(k)
    start = 0
    # 3+3 fills 6, the third batch straddles the end, 10 > K overwrites everything, 0 is a no-op.
    for n in [3, 3, 3, 5, 10, 1, 0, 6, 2]:
        emb, ids, h = rows(n, start)
        # unique images only on the image side: every other row
        q.enqueue(emb[::2], ids[::2], torch.from_numpy(emb), torch.from_numpy(ids), torch.from_numpy(h))
        ni.push(emb[::2], ids[::2])
        nt.push(emb, ids, h)
        start += n
        assert_same_as_naive(q, ni, nt)
        assert q.rings["txt"].ptr == start % k


def test_empty_slots_are_never_negatives(tmp_path):
    q = NegativeQueue.create(tmp_path / "q", size=16, dim=D)
    a = q.active("cpu")
    assert a.img.shape == (0, D) and a.txt_ids.shape == (0,) and a.txt_hash is None
    emb, ids, _ = rows(5, 100)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q.enqueue(emb, ids, emb)
    a = q.active("cpu")
    assert a.img.shape == (5, D) and q.fill == {"img": 5, "txt": 5}
    # The loss over the active queue equals the loss over exactly the rows enqueued: the 11 empty (zero)
    # slots would otherwise add exp(0) terms to every row's softmax.
    g = torch.Generator().manual_seed(0)
    s = torch.nn.functional.normalize(torch.randn(3, D, generator=g), dim=1)
    t = torch.nn.functional.normalize(torch.randn(3, D, generator=g), dim=1)
    bid = torch.tensor([0, 1, 2])
    crit = ContrastiveDistillLoss(0.5)
    got = crit(s, s, t, t, bid, a.img, a.txt, a.img_ids, a.txt_ids)["cd"]
    e, i = torch.from_numpy(emb), torch.from_numpy(ids)
    want = crit(s, s, t, t, bid, e, e, i, i)["cd"]
    full = q.rings["img"]
    all_emb = torch.from_numpy(np.array(full.emb))
    all_ids = torch.from_numpy(np.array(full.ids)) + 1000  # nothing masked
    with_empty = crit(s, s, t, t, bid, all_emb, all_emb, all_ids, all_ids)["cd"]
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert with_empty.item() != pytest.approx(got.item(), rel=1e-3)


@pytest.mark.parametrize("zero_copy", [False, True])
def test_device_copy_tracks_enqueues_incrementally(tmp_path, monkeypatch, zero_copy):
    q = NegativeQueue.create(tmp_path / "q", size=9, dim=D, with_hash=True, dtype="float16",
                             cpu_zero_copy=zero_copy)
    emb, ids, h = rows(4, 0)
    q.enqueue(emb, ids, emb, ids, h)
    q.active("cpu")  # builds the device copy once
    uploads = []
    monkeypatch.setattr(_Ring, "upload", lambda self, dev: uploads.append(dev))
    start = 4
    for n in [2, 5, 7, 3, 11]:
        emb, ids, h = rows(n, start)
        q.enqueue(torch.from_numpy(emb).to(torch.bfloat16), ids, emb, ids, h)
        start += n
        assert_device_equals_memmap(q)
    assert uploads == []  # synced row by row, never re-uploaded
    assert q.active("cpu").img.dtype == torch.float16


def test_cpu_zero_copy_views_the_memmap(tmp_path):
    q = NegativeQueue.create(tmp_path / "q", size=6, dim=D)
    q.active("cpu")
    emb, ids, _ = rows(4, 0)
    q.enqueue(emb, ids, emb, ids)
    a = q.active("cpu")
    assert a.img.data_ptr() == q.rings["img"].emb.ctypes.data  # no second copy in RAM
    np.testing.assert_array_equal(a.txt.numpy(), emb)


@pytest.mark.parametrize("zero_copy", [False, True])
def test_enqueue_before_backward_fails_loudly(tmp_path, zero_copy):
    """The documented contract (enqueue after backward) is enforced by autograd, not silently broken."""
    q = NegativeQueue.create(tmp_path / "q", size=6, dim=D, cpu_zero_copy=zero_copy)
    emb, ids, _ = rows(6, 0)
    q.enqueue(emb, ids, emb, ids)
    a = q.active("cpu")
    s = torch.randn(2, D, requires_grad=True)
    loss = ContrastiveDistillLoss(0.1)(s, s, s.detach(), s.detach(), torch.tensor([100, 101]), a.img, a.txt,
                                       a.img_ids, a.txt_ids)["cd"]
    q.enqueue(emb[:2], ids[:2] + 50, emb[:2], ids[:2] + 50)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_state_dict_roundtrip_through_file_is_exact(tmp_path):
    q = NegativeQueue.create(tmp_path / "a", size=10, dim=D, with_hash=True)
    start = 0
    for n in [4, 4, 5]:  # wrapped, ptr mid-ring
        emb, ids, h = rows(n, start)
        q.enqueue(emb, ids, emb, ids, h)
        start += n
    torch.save(q.state_dict(), tmp_path / "ckpt.pt")
    r = NegativeQueue.create(tmp_path / "b", size=10, dim=D, with_hash=True, cpu_zero_copy=False)
    r.active("cpu")  # a stale device copy must be replaced by the loaded contents
    r.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    for m in ("img", "txt"):
        assert (r.rings[m].ptr, r.rings[m].fill) == (q.rings[m].ptr, q.rings[m].fill)
        for key in q.contents(m):
            np.testing.assert_array_equal(r.contents(m)[key], q.contents(m)[key])
    assert_device_equals_memmap(r)
    # Resumed and uninterrupted queues keep evolving identically.
    emb, ids, h = rows(6, start)
    for x in (q, r):
        x.enqueue(emb, ids, emb, ids, h)
    for m in ("img", "txt"):
        np.testing.assert_array_equal(r.contents(m)["emb"], q.contents(m)["emb"])
        np.testing.assert_array_equal(np.asarray(r.rings[m].emb), np.asarray(q.rings[m].emb))
    with pytest.raises(PipelineError):
        NegativeQueue.create(tmp_path / "c", size=11, dim=D, with_hash=True).load_state_dict(q.state_dict())


def test_partial_queue_state_roundtrip(tmp_path):
    q = NegativeQueue.create(tmp_path / "a", size=10, dim=D)
    emb, ids, _ = rows(3, 0)
    q.enqueue(emb, ids, emb, ids)
    r = NegativeQueue.create(tmp_path / "b", size=10, dim=D)
    r.load_state_dict(q.state_dict())
    assert r.fill == {"img": 3, "txt": 3} and r.rings["img"].ptr == 3
    emb2, ids2, _ = rows(9, 3)
    for x in (q, r):
        x.enqueue(emb2, ids2, emb2, ids2)
    np.testing.assert_array_equal(r.contents("txt")["ids"], q.contents("txt")["ids"])


def test_refill_random_from_sampler(tmp_path):
    cache = rows(50, 0)
    rng = np.random.default_rng(0)
    drawn = []

    def sample(n):
        idx = rng.integers(0, 50, size=n)
        drawn.append(idx)
        return QueueBatch(img=cache[0][idx], img_ids=cache[1][idx], txt=torch.from_numpy(cache[0][idx]),
                          txt_hash=cache[2][idx])

    q = NegativeQueue.create(tmp_path / "q", size=20, dim=D, with_hash=True, cpu_zero_copy=False)
    emb, ids, h = rows(3, 100)
    q.enqueue(emb, ids, emb, ids, h)
    q.active("cpu")
    q.refill_random(sample, chunk=8)
    idx = np.concatenate(drawn)
    assert [len(d) for d in drawn] == [8, 8, 4] and q.fill == {"img": 20, "txt": 20}
    np.testing.assert_array_equal(np.asarray(q.rings["txt"].emb), cache[0][idx])
    np.testing.assert_array_equal(np.asarray(q.rings["txt"].hash), cache[2][idx])
    assert_device_equals_memmap(q)  # device copy rebuilt after the bulk replacement
    with pytest.raises(PipelineError):
        q.refill_random(lambda n: QueueBatch(cache[0][:2], cache[1][:2], cache[0][:2], txt_hash=cache[2][:2]))


def test_bad_inputs_are_pipeline_errors(tmp_path):
    q = NegativeQueue.create(tmp_path / "q", size=4, dim=D, with_hash=True)
    emb, ids, h = rows(2, 0)
    with pytest.raises(PipelineError):
        q.enqueue(emb, ids, emb, ids)  # hash missing
    with pytest.raises(PipelineError):
        q.enqueue(emb[:, :3], ids, emb, ids, h)  # wrong width
    with pytest.raises(PipelineError):
        q.enqueue(emb, ids[:1], emb, ids, h)  # ids length
    with pytest.raises(PipelineError):
        NegativeQueue.create(tmp_path / "z", size=0, dim=D)
    assert q.fill == {"img": 0, "txt": 0}  # nothing half-written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_device_copy(tmp_path):
    q = NegativeQueue.create(tmp_path / "q", size=64, dim=D, with_hash=True)
    q.active("cuda")
    start = 0
    for n in [30, 30, 30]:
        emb, ids, h = rows(n, start)
        q.enqueue(torch.from_numpy(emb).cuda().half(), torch.from_numpy(ids).cuda(), emb, ids, h)
        start += n
    a = q.active("cuda")
    assert a.img.is_cuda
    r = q.rings["img"]
    np.testing.assert_array_equal(a.img.cpu().numpy(), np.asarray(r.emb[: r.fill]))
    np.testing.assert_array_equal(a.txt_hash.cpu().numpy(), np.asarray(q.rings["txt"].hash[: r.fill]))
