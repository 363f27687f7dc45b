"""Negative queue of teacher embeddings for contrastive distillation (docs/method.md 1.1).

``NegativeQueue`` keeps K teacher embeddings per modality (image, text) with their ``image_id`` and,
optionally, a caption hash per text entry (``pipeline.distill.losses.caption_hashes``). Each modality is a ring
buffer with its own write pointer and fill count, backed by ``np.memmap`` files in a directory, so K can
be very large (1,000,000 x D is fine; the files need not fit in RAM). ``active(device)`` returns the
filled entries as tensors on the training device; that device copy is uploaded once and then updated
row-by-row on every ``enqueue``, never re-uploaded per step. On CPU the tensors are, by default, views
of the memmaps themselves (no copy at all).

Two ways to fill it (method.md 1.1):
    * FIFO of recent batches (paper, default): ``enqueue(...)`` after every step.
    * Random rows of the cache (possible because the teacher is frozen, so entries never go stale):
      ``refill_random(sample_fn)`` replaces the whole queue; call it at start and/or every N steps.

Trainer contract::

    q = NegativeQueue.create(run_dir / "queue", size=8192, dim=D, with_hash=True)
    neg = q.active(device)             # ActiveQueue: only the filled slots, never empty ones
    losses = crit(..., queue=neg)
    total.backward()
    q.enqueue(t_img, img_ids, t_txt, txt_ids, txt_hash)   # AFTER backward: the tensors in `neg` are
                                       # views of the device buffer and are updated in place, which
                                       # autograd rejects if the graph still needs them
    ckpt["queue"] = q.state_dict()     # contents + pointers + fill: resume is exact

DDP: ``enqueue`` takes tensors that are already gathered across ranks (the trainer does the
``all_gather``), so every rank enqueues the same global batch and all queues stay identical. Give each
rank its own directory (e.g. ``queue/rank3``): ranks must not write the same memmap files.

Rows of one image share its teacher image embedding; a trainer may enqueue unique images only
(``img`` and ``txt`` may have different row counts) so duplicates do not waste image slots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from pipeline.common import io
from pipeline.common.errors import PipelineError

META_FILE = "queue.json"
_MODALITIES = ("img", "txt")


class ActiveQueue(NamedTuple):
    """Filled queue entries on one device; what ``pipeline.distill.losses`` consumes as negatives."""

    img: Tensor  # (K_img, D)
    img_ids: Tensor  # (K_img,) int64
    txt: Tensor  # (K_txt, D)
    txt_ids: Tensor  # (K_txt,) int64
    txt_hash: Tensor | None  # (K_txt,) int64 caption hashes, or None when the queue keeps none


@dataclass
class QueueBatch:
    """Rows to put in the queue; arrays may be numpy or torch (any device, any float dtype).

    ``txt_ids`` defaults to ``img_ids`` (one row per pair). ``txt_hash`` is required iff the queue was
    created ``with_hash=True``.
    """

    img: Tensor | np.ndarray
    img_ids: Tensor | np.ndarray
    txt: Tensor | np.ndarray
    txt_ids: Tensor | np.ndarray | None = None
    txt_hash: Tensor | np.ndarray | None = None


def _np(x: Tensor | np.ndarray, dtype: np.dtype) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x, dtype=dtype)


class _Ring:
    """One modality: embeddings (+ ids, + optional hash) in memmaps, a write pointer and a fill count.

    Invariant: while ``fill < size`` the filled slots are exactly ``[0, fill)`` and ``ptr == fill``
    (filling starts at 0 and a full refill sets ``fill = size``), so ``[:fill]`` is always the valid set.
    """

    def __init__(self, directory: Path, name: str, size: int, dim: int, dtype: np.dtype, with_hash: bool,
                 mode: str, cpu_zero_copy: bool) -> None:
        self.size, self.dim, self.dtype = size, dim, dtype
        self.emb = np.memmap(directory / f"{name}_emb.bin", dtype=dtype, mode=mode, shape=(size, dim))
        self.ids = np.memmap(directory / f"{name}_ids.bin", dtype=np.int64, mode=mode, shape=(size,))
        self.hash = (np.memmap(directory / f"{name}_hash.bin", dtype=np.int64, mode=mode, shape=(size,))
                     if with_hash else None)
        self.ptr = 0
        self.fill = 0
        self._dev: dict[str, Tensor] | None = None  # device copy of all `size` slots
        self.cpu_zero_copy = cpu_zero_copy
        self._shared = False  # True when _dev are views of the memmaps themselves (CPU, zero-copy)

    # -- writing -------------------------------------------------------------------------------
    def write(self, emb: Tensor | np.ndarray, ids: Tensor | np.ndarray,
              hsh: Tensor | np.ndarray | None) -> None:
        """Append n rows FIFO; if n > size only the last `size` rows survive (as if written one by one)."""
        n = len(emb)
        if n == 0:
            return
        keep = min(n, self.size)
        start = (self.ptr + n - keep) % self.size
        cols = {"emb": emb[n - keep:], "ids": ids[n - keep:]}
        if self.hash is not None:
            cols["hash"] = hsh[n - keep:]
        # A batch straddling the end of the ring is written in (at most) two contiguous chunks.
        first = min(keep, self.size - start)
        for dst, lo, hi in ((start, 0, first), (0, first, keep)):
            if hi > lo:
                self._put(dst, {k: v[lo:hi] for k, v in cols.items()})
        self.ptr = (self.ptr + n) % self.size
        self.fill = min(self.fill + n, self.size)

    def _put(self, dst: int, cols: dict[str, Tensor | np.ndarray]) -> None:
        n = len(cols["emb"])
        np_dtypes = {"emb": self.dtype, "ids": np.int64, "hash": np.int64}
        for k, v in cols.items():
            host = _np(v, np_dtypes[k])
            if self._shared:
                # Same memory as the memmap; writing through torch bumps autograd's version counter, so
                # an enqueue before backward() fails loudly instead of silently changing the gradient.
                self._dev[k][dst:dst + n] = torch.from_numpy(host)
                continue
            getattr(self, k)[dst:dst + n] = host
            if self._dev is not None:
                # Incremental device update: only the new rows cross the bus (straight from the device
                # when the input already lives there, e.g. a gathered teacher batch).
                d = self._dev[k]
                src = v.detach() if isinstance(v, Tensor) else torch.from_numpy(host)
                d[dst:dst + n] = src.to(device=d.device, dtype=d.dtype, non_blocking=True)

    def replace_all(self, emb: np.ndarray, ids: np.ndarray, hsh: np.ndarray | None, rows: int) -> None:
        """Overwrite slots [0, rows) (memmap only), used by refill / load; resets pointer and fill."""
        self.emb[:rows] = emb
        self.ids[:rows] = ids
        if self.hash is not None:
            self.hash[:rows] = hsh
        self.fill = rows
        self.ptr = rows % self.size

    # -- reading -------------------------------------------------------------------------------
    def device_view(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        if self._dev is None or self._dev["emb"].device != device:
            self.upload(device)
        d, f = self._dev, self.fill
        return d["emb"][:f], d["ids"][:f], (d["hash"][:f] if "hash" in d else None)

    def upload(self, device: torch.device) -> None:
        """(Re)build the device copy from the memmap: once, or after a bulk replacement."""
        self._shared = device.type == "cpu" and self.cpu_zero_copy
        if self._shared:
            # Tensors over the memmaps: no second copy in RAM, and enqueue writes are seen directly.
            self._dev = {"emb": torch.from_numpy(self.emb), "ids": torch.from_numpy(self.ids)}
            if self.hash is not None:
                self._dev["hash"] = torch.from_numpy(self.hash)
            return
        tdtype = torch.float16 if self.dtype == np.float16 else torch.float32
        dev = {"emb": torch.empty((self.size, self.dim), dtype=tdtype, device=device),
               "ids": torch.empty((self.size,), dtype=torch.int64, device=device)}
        if self.hash is not None:
            dev["hash"] = torch.empty((self.size,), dtype=torch.int64, device=device)
        chunk = max(1, (64 << 20) // max(1, self.dim * self.emb.itemsize))  # ~64 MiB host staging
        for lo in range(0, self.fill, chunk):
            hi = min(self.fill, lo + chunk)
            dev["emb"][lo:hi] = torch.from_numpy(np.array(self.emb[lo:hi]))
            dev["ids"][lo:hi] = torch.from_numpy(np.array(self.ids[lo:hi]))
            if self.hash is not None:
                dev["hash"][lo:hi] = torch.from_numpy(np.array(self.hash[lo:hi]))
        self._dev = dev

    def refresh_device(self) -> None:
        if self._dev is not None:
            self.upload(self._dev["emb"].device)

    def ordered(self) -> dict[str, np.ndarray]:
        """Filled entries oldest -> newest (a copy)."""
        idx = np.arange(self.fill) if self.fill < self.size else (np.arange(self.size) + self.ptr) % self.size
        out = {"emb": np.asarray(self.emb[idx]), "ids": np.asarray(self.ids[idx])}
        if self.hash is not None:
            out["hash"] = np.asarray(self.hash[idx])
        return out

    def flush(self) -> None:
        for arr in (self.emb, self.ids, self.hash):
            if arr is not None:
                arr.flush()


class NegativeQueue:
    """K teacher embeddings per modality in memmap-backed FIFO rings (see the module docstring).

    Build with ``NegativeQueue.create(...)`` (fresh, empty); a resumed run restores the checkpoint's contents
    with ``load_state_dict``.
    """

    def __init__(self, directory: str | os.PathLike, size: int, dim: int, *, with_hash: bool = False,
                 dtype: str = "float32", cpu_zero_copy: bool = True, _mode: str = "w+") -> None:
        if size <= 0 or dim <= 0:
            raise PipelineError(f"negative queue needs size > 0 and dim > 0, got size={size}, dim={dim}")
        if dtype not in ("float32", "float16"):
            raise PipelineError(f"negative queue dtype must be float32 or float16, got {dtype!r}")
        self.directory = Path(directory)
        self.size, self.dim, self.with_hash, self.dtype = int(size), int(dim), bool(with_hash), dtype
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rings = {m: _Ring(self.directory, m, self.size, self.dim, np.dtype(dtype),
                               self.with_hash and m == "txt", _mode, cpu_zero_copy) for m in _MODALITIES}

    @classmethod
    def create(cls, directory: str | os.PathLike, size: int, dim: int, *, with_hash: bool = False,
               dtype: str = "float32", cpu_zero_copy: bool = True) -> "NegativeQueue":
        """A new, empty queue; existing queue files in ``directory`` are overwritten.

        Args:
            size: K, entries per modality.
            dim: D, the teacher embedding width.
            with_hash: keep a caption hash per text entry (masks identical captions, method.md 1.1).
            dtype: storage (and device copy) dtype, ``float32`` or ``float16``.
            cpu_zero_copy: ``active("cpu")`` returns tensors over the memmaps themselves instead of a copy
                in RAM (what lets a CPU run use a queue larger than RAM).
        """
        q = cls(directory, size, dim, with_hash=with_hash, dtype=dtype, cpu_zero_copy=cpu_zero_copy,
                _mode="w+")
        q.flush()
        return q

    # -- filling -------------------------------------------------------------------------------
    def enqueue(
        self,
        img: Tensor | np.ndarray,
        img_ids: Tensor | np.ndarray,
        txt: Tensor | np.ndarray,
        txt_ids: Tensor | np.ndarray | None = None,
        txt_hash: Tensor | np.ndarray | None = None,
    ) -> None:
        """Append teacher rows FIFO (oldest entries are overwritten). Inputs must be gathered over ranks.

        Args:
            img: (N_img, D) teacher image embeddings; img_ids: (N_img,).
            txt: (N_txt, D) teacher text embeddings; txt_ids: (N_txt,), defaults to ``img_ids``.
            txt_hash: (N_txt,) caption hashes; required iff the queue was created ``with_hash``.
        """
        txt_ids = img_ids if txt_ids is None else txt_ids
        self._check(img, img_ids, "image")
        self._check(txt, txt_ids, "text", txt_hash)
        self.rings["img"].write(img, img_ids, None)
        self.rings["txt"].write(txt, txt_ids, txt_hash)

    def refill_random(self, sample_fn: Callable[[int], QueueBatch], chunk: int = 65536) -> None:
        """Replace the whole queue with rows drawn by ``sample_fn(n) -> QueueBatch`` (random cache rows).

        Called in chunks of at most ``chunk`` rows so a 1M-entry queue never sits in RAM at once. Afterwards
        the queue is full and the device copy (if any) is rebuilt once.
        """
        done = 0
        while done < self.size:
            n = min(chunk, self.size - done)
            b = sample_fn(n)
            tids = b.img_ids if b.txt_ids is None else b.txt_ids
            self._check(b.img, b.img_ids, "image")
            self._check(b.txt, tids, "text", b.txt_hash)
            if len(b.img) != n or len(b.txt) != n:
                raise PipelineError(f"queue sampler returned {len(b.img)} image / {len(b.txt)} text rows, "
                                    f"asked for {n}")
            for m, (e, i, h) in (("img", (b.img, b.img_ids, None)), ("txt", (b.txt, tids, b.txt_hash))):
                r = self.rings[m]
                r.emb[done:done + n] = _np(e, r.dtype)
                r.ids[done:done + n] = _np(i, np.int64)
                if r.hash is not None:
                    r.hash[done:done + n] = _np(h, np.int64)
            done += n
        for r in self.rings.values():
            r.fill, r.ptr = self.size, 0
            r.refresh_device()

    def _check(self, emb, ids, what: str, hsh=None) -> None:
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise PipelineError(f"queue {what} rows must be (N, {self.dim}), got {tuple(emb.shape)}")
        if len(ids) != len(emb):
            raise PipelineError(f"queue {what}: {len(emb)} embeddings but {len(ids)} image ids")
        if what == "text":
            if self.with_hash and (hsh is None or len(hsh) != len(emb)):
                raise PipelineError("queue keeps caption hashes: pass txt_hash with one hash per text row")
            if not self.with_hash and hsh is not None:
                raise PipelineError("queue was created without caption hashes (with_hash=False) but "
                                    "txt_hash was given")

    # -- reading -------------------------------------------------------------------------------
    @property
    def fill(self) -> dict[str, int]:
        """Number of valid entries per modality (empty slots are never returned as negatives)."""
        return {m: r.fill for m, r in self.rings.items()}

    def active(self, device: torch.device | str = "cpu") -> ActiveQueue:
        """Filled entries as tensors on ``device`` (views of a device copy kept in sync by ``enqueue``)."""
        device = torch.device(device)
        ie, ii, _ = self.rings["img"].device_view(device)
        te, ti, th = self.rings["txt"].device_view(device)
        return ActiveQueue(ie, ii, te, ti, th)

    def contents(self, modality: str) -> dict[str, np.ndarray]:
        """Filled entries of ``"img"`` or ``"txt"``, oldest first, read from the memmap (a copy)."""
        return self.rings[modality].ordered()

    # -- persistence ---------------------------------------------------------------------------
    def flush(self) -> None:
        """Write the memmaps to disk, and the shape and fill to ``queue.json`` (for people inspecting a run)."""
        for r in self.rings.values():
            r.flush()
        meta = {"size": self.size, "dim": self.dim, "with_hash": self.with_hash, "dtype": self.dtype,
                **{m: {"ptr": r.ptr, "fill": r.fill} for m, r in self.rings.items()}}
        io.write_json(self.directory / META_FILE, meta, indent=1)

    def state_dict(self) -> dict:
        """Everything needed for an exact resume: shapes, pointers, fill counts and the filled contents.

        Contents are CPU tensors of the filled slots in slot order (K x D per modality; ~25 MiB at the
        paper's K=8192, D=768, fp32).
        """
        sd: dict = {"size": self.size, "dim": self.dim, "with_hash": self.with_hash, "dtype": self.dtype}
        for m, r in self.rings.items():
            f = r.fill
            sd[m] = {"ptr": r.ptr, "fill": f,
                     "emb": torch.from_numpy(np.array(r.emb[:f])),
                     "ids": torch.from_numpy(np.array(r.ids[:f])),
                     "hash": torch.from_numpy(np.array(r.hash[:f])) if r.hash is not None else None}
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Restore contents, pointers and fill from ``state_dict()``; the device copy follows."""
        mine = (self.size, self.dim, self.with_hash, self.dtype)
        theirs = (sd.get("size"), sd.get("dim"), sd.get("with_hash"), sd.get("dtype"))
        if mine != theirs:
            raise PipelineError(f"queue checkpoint (size, dim, with_hash, dtype) = {theirs} does not match "
                                f"this queue {mine}")
        for m, r in self.rings.items():
            s = sd[m]
            f = int(s["fill"])
            hsh = s["hash"].numpy() if s["hash"] is not None else None
            r.replace_all(s["emb"].numpy(), s["ids"].numpy(), hsh, f)
            r.ptr = int(s["ptr"])
            r.refresh_device()
