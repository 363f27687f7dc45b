"""Stage-2 data path: manifest rows -> student pixels + captions, teacher targets from the cache.

The teacher never runs here: each row's targets are rows of the memory-mapped cache, resolved to
row indices once at start-up so a training step does one gather per modality.

Determinism (exact resume): the epoch's row order comes from (seed, epoch), and each item's
augmentation from (seed, epoch, position), independent of worker count and of where a resumed
run starts. A resumed epoch simply starts its order at the saved position. Transfer images (caption-less,
``pipeline.distill.transfer``) ride in the same batches: item ``N + p`` is stream position ``p``.

Memory: an item key carries its epoch, so the DataLoader's workers live for the whole run (forked once, before
training grows the heap). A worker forked every epoch from a process that rewrites gigabytes of activations and
gradients each step keeps its own copy of every page the trainer writes afterwards: with 16k preloaded images
that doubled a run's memory (bench/bench_loader_memory.py). Preloaded and streamed images are the same pixels
(both downsized to ``preload_size``), so preloading, which ``preload_limit_gb`` caps, never changes results.
View replay crops the full-resolution image, as stage 1 did, and resizes the crop to the student's size; preloading
then keeps those crops (never a downsized copy to crop from: the student would not see the teacher's pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.features.cache import FeatureCache
from pipeline.common.errors import PipelineError
from pipeline.data.images import ImageDecodeError, load_rgb
from pipeline.distill.losses import caption_hashes
from pipeline.data.loader import seeded_augmentation, worker_start_method, yielding_worker
from pipeline.data.manifest import Manifest
from pipeline.distill.transfer import TransferImages, TransferStream
from pipeline.features.views import ViewTransform, pick_view
from pipeline.students.preprocess import ImageTransform, InputBatcher


@dataclass
class AlignedRows:
    """Manifest rows that have cached targets, with their cache row indices."""

    image_ids: np.ndarray  # (N,) int64
    sample_ids: np.ndarray  # (N,)
    captions: list[str]
    locations: list[str]  # resolved image locations
    image_rows: np.ndarray  # (N,) rows into cache.image
    text_rows: np.ndarray  # (N,) rows into cache.text
    caption_hash: np.ndarray  # (N,) int64, for identical-caption masking (method.md 1.1)
    dropped: int  # manifest rows without cached targets (rejected in stage 1)
    image_only: int = 0  # declared image-only rows of the manifest (not pairs: not rows of this table)
    caption_only: int = 0  # declared caption-only rows (likewise)

    def __len__(self) -> int:
        return len(self.sample_ids)


def align(manifest: Manifest, cache: FeatureCache | None) -> AlignedRows:
    """Keep the rows the cache has targets for; the others were stage-1 rejects. Without a cache (training on
    the pairs alone, e.g. a teacher) every row is kept and the cache row indices are empty."""
    image_only, caption_only = int(manifest.image_only_mask().sum()), int(manifest.caption_only_mask().sum())
    manifest = manifest.paired() if image_only or caption_only else manifest
    sample_ids = manifest.column("sample_id").astype(np.int64)
    cached = np.isin(sample_ids, cache.sample_ids) if cache is not None else np.ones(len(sample_ids), bool)
    if not cached.any():
        raise PipelineError("no manifest row has a cached teacher target: is the cache for this dataset/split?")
    t = manifest.table
    keep = np.flatnonzero(cached)
    captions = [t.column("caption")[int(i)].as_py() for i in keep]
    paths = t.column("image_path").to_pylist()
    image_ids = manifest.column("image_id").astype(np.int64)[keep]
    return AlignedRows(
        image_ids=image_ids,
        sample_ids=sample_ids[keep],
        captions=captions,
        locations=[manifest.resolve(paths[int(i)]) for i in keep],
        image_rows=cache.image_rows(image_ids) if cache is not None else np.empty(0, np.int64),
        text_rows=cache.text_rows(sample_ids[keep]) if cache is not None else np.empty(0, np.int64),
        caption_hash=caption_hashes(captions),
        dropped=int((~cached).sum()),
        image_only=image_only,
        caption_only=caption_only,
    )


class EpochOrder(Sampler[int]):
    """Seeded permutation per epoch, sharded across DDP ranks, startable at a saved position."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.start = 0, 0

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            perm = np.arange(self.n)
        else:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        per_rank = self.n // self.world  # equal length on every rank keeps DDP steps in lock-step
        return perm[self.rank * per_rank : (self.rank + 1) * per_rank]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start :].tolist())

    def __len__(self) -> int:
        return len(self.order(self.epoch)) - self.start


@dataclass
class ViewReplay:
    """Cached augmented views to replay (features.views): the student's view transform, how many of the cached
    views to use, and each pair row's / transfer row's recorded view parameters (N, K_cache, 5)."""

    transform: ViewTransform
    count: int
    pair_params: np.ndarray
    transfer_params: np.ndarray | None = None


def preload_bytes(n_images: int, size: int | None, per_image: int = 1) -> int:
    """Upper bound of the RAM that ``n_images`` preloaded images take: PIL keeps RGB at 4 bytes a pixel, and
    each image fits in size x size (unknown without a size: counted as 512 x 512); ``per_image``: pictures kept
    per image (the cached view crops)."""
    side = size or 512
    return n_images * per_image * side * side * 4


class PairDataset(Dataset):
    """Key = (epoch, index); item = (index, student pixels or None, error, view). Index < len(rows): a pair
    (captions are looked up by row); index N + p: the transfer image at stream position p. View: which cached view
    the pixels replay (-1 without view replay: the student's own random augmentation).

    ``preload`` decodes every image once into RAM, downsized to fit ``preload_size`` (what the student's
    crops are taken from); without it each item is decoded and downsized the same way, so the pixels agree.
    With view replay it keeps each image's ``views.count`` view crops instead, cut from the full-resolution image
    like the streamed items."""

    def __init__(self, rows: AlignedRows, transform: Callable, seed: int, preload: bool = False,
                 preload_size: int | None = None, transfer: TransferImages | None = None,
                 stream: TransferStream | None = None, views: ViewReplay | None = None,
                 preload_limit: int | None = None, channels_last: bool = False):
        self.rows, self.transform, self.seed, self.preload_size = rows, transform, seed, preload_size
        self.transfer, self.stream, self.views = transfer, stream, views
        # items are uint8 pixels that the collate turns into a batch at once, where the normalisation is known
        # (a student's transform, or view replay); any other transform's items are its tensors, stacked
        norm = views.transform if views else transform.settings if isinstance(transform, ImageTransform) else None
        self.batcher = InputBatcher(norm.mean, norm.std, channels_last) if norm is not None else None
        self._images: dict[str, Image.Image] = {}
        self._crops: dict[str, list[Image.Image]] = {}  # view replay: location -> its first views.count crops
        locations = self.locations()
        bound = (preload_bytes(len(locations), views.transform.size, views.count) if views
                 else preload_bytes(len(locations), preload_size))
        if not preload:
            self.preload_summary = f"{len(locations)} streamed from disk (data.preload: false)"
        elif preload_limit is not None and bound > preload_limit:
            self.preload_summary = (f"{len(locations)} streamed from disk: preloading them could take "
                                    f"{bound / 2**30:.1f} GiB > data.preload_limit_gb {preload_limit / 2**30:g}")
        else:  # decode once, keep in RAM, shared with the workers (forked once, never written after)
            params = self._view_params() if views else {}
            for loc in locations:
                try:
                    if views:
                        img = load_rgb(loc)
                        self._crops[loc] = [views.transform.render(img, p) for p in params[loc][:views.count]]
                    else:
                        self._images[loc] = self._decode(loc)
                except ImageDecodeError:
                    continue  # reported per item, as a streamed run would
            what = f" as their {views.count} view crops" if views else ""
            self.preload_summary = (f"{len(self._images) + len(self._crops)} preloaded into RAM{what} "
                                    f"(at most {bound / 2**30:.1f} GiB)")

    def locations(self) -> list[str]:
        """Every distinct image this dataset can serve: the pairs' and the transfer images."""
        return list(dict.fromkeys(self.rows.locations + (self.transfer.locations if self.transfer else [])))

    def _view_params(self) -> dict[str, np.ndarray]:
        """Location -> its cached view parameters (captions of one image share them; transfer images are no pairs)."""
        out = dict(zip(self.rows.locations, self.views.pair_params))
        if self.transfer is not None:
            out.update(zip(self.transfer.locations, self.views.transfer_params))
        return out

    def _decode(self, loc: str) -> Image.Image:
        img = load_rgb(loc)
        if self.preload_size:
            img.thumbnail((self.preload_size, self.preload_size), Image.BICUBIC)
        return img

    def __len__(self) -> int:
        return len(self.rows)

    def _source(self, i: int) -> tuple[str, np.ndarray | None]:
        """(image location, its cached view parameters or None) of item ``i``."""
        n, v = len(self.rows), self.views
        if i < n:
            return self.rows.locations[i], v.pair_params[i] if v else None
        row = int(self.stream.rows(np.array([i - n]))[0])
        return self.transfer.locations[row], v.transfer_params[row] if v else None

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        loc, params = self._source(i)
        if params is not None:  # replay a cached view: exactly the crop the teacher embedded
            view = pick_view(self.seed, epoch, i, self.views.count)
            try:
                crops = self._crops.get(loc)
                crop = crops[view] if crops else self.views.transform.render(load_rgb(loc), params[view])
            except ImageDecodeError as exc:
                return i, None, str(exc), -1
            return i, np.asarray(crop if crop.mode == "RGB" else crop.convert("RGB")), None, view
        try:
            img = self._images.get(loc) or self._decode(loc)
        except ImageDecodeError as exc:
            return i, None, str(exc), -1
        # Augmentation draws from a seed fixed by (seed, epoch, index): identical on resume, any workers.
        with seeded_augmentation(self.seed, epoch, i):
            return i, self.transform.pixels(img) if self.batcher else self.transform(img), None, -1


class MixedBatches(Sampler[list]):
    """Batches of ``batch_size`` pairs in the epoch order (last partial batch dropped), each followed by the
    step's transfer images (indices ``N + stream position``); without a stream, plain pair batches. Each key is
    (epoch, index): the workers learn the epoch from the keys, not from state set between epochs."""

    def __init__(self, order: EpochOrder, batch_size: int, n_pairs: int, stream: TransferStream | None = None):
        self.order, self.batch_size, self.n_pairs, self.stream = order, batch_size, n_pairs, stream

    def __iter__(self):
        rows = list(self.order)
        steps_per_epoch = len(self.order.order(self.order.epoch)) // self.batch_size  # whatever the start
        first_step = self.order.epoch * steps_per_epoch + self.order.start // self.batch_size
        for k in range(len(rows) // self.batch_size):
            batch = rows[k * self.batch_size:(k + 1) * self.batch_size]
            if self.stream is not None and self.stream.per_step:
                batch += (self.n_pairs + self.stream.positions(first_step + k)).tolist()
            yield [(self.order.epoch, i) for i in batch]

    def __len__(self) -> int:
        return len(self.order) // self.batch_size


@dataclass
class Batch:
    rows: torch.Tensor  # (B,) indices into AlignedRows
    pixels: torch.Tensor  # (B + T, ...): the pairs' images, then the transfer images
    captions: list[str]
    failures: list[str]
    transfer_rows: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # (T,) pool rows
    views: np.ndarray | None = None  # (B + T,) replayed view of each image (-1: none), pairs then transfer


class BatchCollate:
    """Items -> ``Batch``: a class, not a closure, so loader workers started by spawn (macOS, or a process that
    was itself spawned, as the experiment runner's runs are) can receive it."""

    def __init__(self, rows: AlignedRows, stream: TransferStream | None = None,
                 batcher: InputBatcher | None = None):
        self.rows, self.stream, self.batcher = rows, stream, batcher

    def __call__(self, items) -> Batch:
        rows, stream, n = self.rows, self.stream, len(self.rows)
        ok = [(i, x) for i, x, err, _ in items if err is None and i < n]
        extra = [(i - n, x) for i, x, err, _ in items if err is None and i >= n]
        views = [v for i, _, err, v in items if err is None and i < n] + [
            v for i, _, err, v in items if err is None and i >= n]
        return Batch(
            rows=torch.tensor([i for i, _ in ok], dtype=torch.long),
            pixels=(self.batcher or torch.stack)([x for _, x in ok + extra]) if ok or extra else torch.empty(0),
            captions=[rows.captions[i] for i, _ in ok],
            failures=[err for _, _, err, _ in items if err is not None],
            transfer_rows=(torch.from_numpy(stream.rows(np.array([p for p, _ in extra], np.int64)))
                           if extra else torch.empty(0, dtype=torch.long)),
            views=np.asarray(views, np.int64),
        )


def make_loader(dataset: PairDataset, sampler: EpochOrder, batch_size: int, workers: int, seed: int,
                pin: bool, persistent: bool = True) -> DataLoader:
    """The training loader. ``persistent=False`` forks fresh workers every epoch (the old behaviour, kept for
    bench/bench_loader_memory.py's baseline)."""
    g = torch.Generator().manual_seed(seed)  # own generator: worker seeding never touches the global RNG
    batches = MixedBatches(sampler, batch_size, len(dataset.rows), dataset.stream)
    return DataLoader(
        dataset, batch_sampler=batches, num_workers=workers,
        collate_fn=BatchCollate(dataset.rows, dataset.stream, dataset.batcher), pin_memory=pin, generator=g,
        persistent_workers=persistent and workers > 0, prefetch_factor=4 if workers > 0 else None,
        multiprocessing_context=worker_start_method() if workers > 0 else None, worker_init_fn=yielding_worker,
    )


def check_teacher_norms(cache: FeatureCache, normalized: bool) -> None:
    """Un-normalised targets need the norms that stage 1 stores since cache format 1 with norms."""
    if not normalized and (cache.image_norm is None or cache.text_norm is None):
        raise PipelineError(
            f"data.teacher_normalized=false needs the teacher norms, which cache {cache.directory} does not "
            "store; delete that folder and rerun teacher-features to rebuild it")


def gather_targets(cache: FeatureCache, image_rows: np.ndarray, text_rows: np.ndarray,
                   normalized: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Cached teacher rows as float32; ``normalized=False`` restores each row's norm (method.md 1.6 ablation)."""
    t_img = cache.image.gather(image_rows).astype(np.float32)
    t_txt = cache.text.gather(text_rows).astype(np.float32)
    if not normalized:
        t_img *= cache.image_norm[image_rows, None]
        t_txt *= cache.text_norm[text_rows, None]
    return t_img, t_txt


def teacher_targets(cache: FeatureCache, rows: AlignedRows, batch_rows: np.ndarray, device,
                    normalized: bool = True, views: np.ndarray | None = None) -> tuple:
    """(t_img, t_txt) float32 tensors on ``device`` for the batch's rows, gathered from the memmaps. ``views``:
    the replayed view of each row (the image target is then the teacher's embedding of that view)."""
    if views is not None:
        t_img = cache.views.gather(cache.view_rows(rows.image_rows[batch_rows], views)).astype(np.float32)
        t_txt = cache.text.gather(rows.text_rows[batch_rows]).astype(np.float32)
    else:
        t_img, t_txt = gather_targets(cache, rows.image_rows[batch_rows], rows.text_rows[batch_rows], normalized)
    return (torch.from_numpy(t_img).to(device, non_blocking=True),
            torch.from_numpy(t_txt).to(device, non_blocking=True))
