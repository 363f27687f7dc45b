"""Stage 2's training loader: preloading is only a cache (same pixels as streaming), and workers that live for
the whole run still draw each epoch's own augmentation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from pipeline.data.manifest import Manifest
from pipeline.distill.data import AlignedRows, EpochOrder, PairDataset, make_loader, preload_bytes
from tests.gen_cache import make_dataset


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("loader") / "shapes", n_images=20)
    m = Manifest.read(root / "train.parquet")
    ids, paths = m.unique_images()
    n = len(ids)
    return AlignedRows(ids, ids, [f"c{i}" for i in range(n)], [m.resolve(p) for p in paths], np.arange(n),
                       np.arange(n), np.zeros(n, np.int64), 0)


def augment():  # a random crop + flip, as a student's training transform
    return T.Compose([T.RandomResizedCrop(16, scale=(0.5, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])


def test_preloaded_and_streamed_images_give_the_same_pixels(rows):
    # 40 px images downsized to fit 24 px both ways: preloading must not change what the student sees
    preloaded = PairDataset(rows, augment(), seed=3, preload=True, preload_size=24)
    streamed = PairDataset(rows, augment(), seed=3, preload=False, preload_size=24)
    capped = PairDataset(rows, augment(), seed=3, preload=True, preload_size=24, preload_limit=1000)
    assert len(preloaded._images) == len(rows) and not streamed._images and not capped._images
    assert "preloaded" in preloaded.preload_summary and "streamed" in capped.preload_summary
    assert "data.preload_limit_gb" in capped.preload_summary
    for key in [(0, 0), (0, 5), (3, 5), (1, len(rows) - 1)]:
        a, b, c = preloaded[key][1], streamed[key][1], capped[key][1]
        assert a.shape == (3, 16, 16) and torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(preloaded[(0, 5)][1], preloaded[(3, 5)][1])  # the epoch changes the crop
    assert preload_bytes(10, 24) == 10 * 24 * 24 * 4


def test_persistent_workers_see_every_epoch_like_the_main_process(rows):
    ds = PairDataset(rows, augment(), seed=3, preload=True, preload_size=24)

    def epochs(workers: int) -> list[torch.Tensor]:
        order = EpochOrder(len(rows), seed=3)
        loader = make_loader(ds, order, batch_size=4, workers=workers, seed=3, pin=False)
        out = []
        for epoch in range(3):
            order.set_epoch(epoch)
            out.append(torch.cat([b.pixels for b in loader]))
        return out

    in_process, worker = epochs(0), epochs(1)
    for a, b in zip(in_process, worker):
        assert torch.equal(a, b)
    assert not torch.equal(worker[0], worker[1])  # and the epochs differ


def test_the_classification_loader_keeps_its_workers_and_still_sees_every_epoch(rows):
    from pipeline.classify.objective import epoch_order
    from pipeline.classify.student import ImageRows, epoch_loader

    data = ImageRows(rows.locations, augment(), seed=5, preload_size=24)

    def epochs(workers: int) -> list[torch.Tensor]:
        loader, sampler = epoch_loader(data, batch_size=4, workers=workers)
        out, pids = [], set()
        for epoch in range(3):
            sampler.epoch, sampler.order = epoch, epoch_order(len(data), 5, epoch)
            out.append(torch.cat([pixels for _, pixels in loader]))
            pids |= {w.pid for w in getattr(loader._iterator, "_workers", [])}
        assert len(pids) == workers  # the same worker served every epoch
        return out

    in_process, worker = epochs(0), epochs(1)
    for a, b in zip(in_process, worker):
        assert a.shape == (len(data) // 4 * 4, 3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(worker[0], worker[1])
    one = data[(2, 7)]  # a key's pixels depend on (seed, epoch, row) only
    assert one[0] == 7 and torch.equal(one[1], data[(2, 7)][1]) and not torch.equal(one[1], data[(1, 7)][1])


SPAWNED_LOADER = """
import sys
sys.path.insert(0, {root!r})
import multiprocessing, pickle, torch
from pipeline.distill.data import EpochOrder, make_loader
multiprocessing.set_start_method("spawn", force=True)  # what a spawned process (a runner's run) defaults to
ds, n = pickle.load(open(sys.argv[1], "rb"))
order = EpochOrder(n, seed=3)
order.set_epoch(0)
print(sum(len(b.rows) for b in make_loader(ds, order, batch_size=4, workers=1, seed=3, pin=False)))
"""


def test_the_training_loader_works_in_a_process_whose_default_start_method_is_spawn(rows, tmp_path):
    """The experiment runner trains each run in a spawned process: there the loader's workers must still start
    (they failed before: the collate function was a closure that spawn cannot pickle)."""
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.distill.data import BatchCollate

    ds = PairDataset(rows, augment(), seed=3, preload=True, preload_size=24)
    pickle.loads(pickle.dumps(BatchCollate(rows)))  # picklable under any start method
    (tmp_path / "ds.pkl").write_bytes(pickle.dumps((ds, len(rows))))
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", SPAWNED_LOADER.format(root=root), str(tmp_path / "ds.pkl")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == len(rows)


def _priority_after_worker_start(_):
    from pipeline.data.loader import yielding_worker

    before = os.nice(0)
    yielding_worker(0)
    return before, os.nice(0)


def test_a_loader_worker_yields_the_cores_to_the_training_step():
    # the worker fills idle cores instead of taking one from the step's compute threads (bench_distill's data path)
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        before, after = pool.map(_priority_after_worker_start, [0])[0]
    assert after == min(before + 5, 19)
    assert os.nice(0) == before  # the training process itself keeps its priority


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_students_batches_are_its_per_image_inputs_converted_at_once(rows, channels_last):
    """The loader's items are uint8 pixels that the collate normalises as one batch (InputBatcher): the values must
    be exactly the student transform's per-image tensors, in the student's memory layout."""
    from pipeline.distill.data import BatchCollate
    from pipeline.students.preprocess import ImageTransform, TransformSettings

    transform = ImageTransform(TransformSettings(16, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28), hflip=0.5,
                                                 color_jitter=0.5), train=True)
    ds = PairDataset(rows, transform, seed=3, preload=True, preload_size=24, channels_last=channels_last)
    keys = [(1, i) for i in range(len(rows))]
    items = [ds[k] for k in keys]
    assert all(x.dtype == np.uint8 and x.shape == (16, 16, 3) for _, x, _, _ in items)
    batch = BatchCollate(rows, batcher=ds.batcher)(items)
    reference = PairDataset(rows, transform, seed=3, preload=True, preload_size=24)
    reference.batcher = None  # the per-image path: the transform's own ToTensor + Normalize, stacked
    expected = torch.stack([reference[k][1] for k in keys])
    assert torch.equal(batch.pixels, expected)
    assert batch.pixels.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
