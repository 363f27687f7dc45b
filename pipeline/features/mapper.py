"""Stage 1's mapper: the teacher pass over one shard's read input, device input included.

Built once from the teacher (and the embeddings it already knows); turns a ``ShardInput`` into a ``ShardOutput``
of arrays and touches no file, so it can run anywhere the teacher can (a later Ray engine runs it in actors).
Its ``clock`` splits its time into waiting for input batches (reads, decoding, preprocessing) and the model.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from pipeline.data.manifest import Reject
from pipeline.features.device_input import choose_decode
from pipeline.features.encode import PhaseClock, encode_captions, encode_image_locations
from pipeline.features.shard import ShardInput, ShardOutput
from pipeline.features.views import BoundView, ViewSpec, teacher_view_transform
from pipeline.teachers.base import KnownEmbeddings, Teacher

Progress = Callable[[int], None]


def _no_progress(_: int) -> None:
    pass


class FeatureMapper:
    """Teacher embeddings (and norms, views) of a shard's images and captions, encoding only what the teacher
    does not already know (``Teacher.known_embeddings``)."""

    def __init__(self, teacher: Teacher, *, batch_size: int = 64, text_batch_size: int = 256, num_workers: int = 2,
                 dtype: str = "float16", decode: str = "auto", views: ViewSpec | None = None,
                 known: KnownEmbeddings | None = None):
        self.teacher, self.batch_size, self.text_batch_size = teacher, batch_size, text_batch_size
        self.num_workers, self.dtype, self.views, self.known = num_workers, dtype, views, known
        self.known_images = known.image_lookup() if known else {}
        self.known_captions = known.caption_lookup() if known else {}
        preprocess = teacher.tensor_preprocess()
        self.device_preprocess = preprocess if choose_decode(decode, teacher.device, preprocess) else None
        self.clock = PhaseClock()

    def __call__(self, inp: ShardInput, progress: Progress | None = None) -> ShardOutput:
        start, read_before = time.perf_counter(), self.clock.read
        try:
            return self._map(inp, progress or _no_progress)
        finally:
            self.clock.model += (time.perf_counter() - start) - (self.clock.read - read_before)

    def _map(self, inp: ShardInput, progress: Progress) -> ShardOutput:
        rejects: list[Reject] = list(inp.rejects)
        emb, ok, image_norm, failures = self._images(inp, progress)
        views = params = None
        if self.views:
            views, params, view_failures = self._views(inp, ok, progress)
            for pos, _ in view_failures:
                ok[pos] = False
            failures = failures + view_failures
            progress(self.views.count * int((~ok).sum() - len(view_failures)))  # views never drawn for failures
        for pos, reason in failures:
            rows = inp.captions[pos]
            rejects += [Reject(f"sample_id={sid}", reason, inp.paths[pos], cap) for sid, cap in rows]
            progress(len(rows))  # their captions are skipped, not encoded
        kept_ids = inp.image_ids[ok]
        text_rows = [(sid, cap, int(iid)) for iid, ok_i, caps in zip(inp.image_ids.tolist(), ok, inp.captions)
                     if ok_i for sid, cap in caps]
        text, text_norm = self._captions([c for _, c, _ in text_rows], progress)
        lone_text = None
        if inp.lone:
            lone_text, _ = self._captions([c for _, c in inp.lone], progress)
        return ShardOutput(
            index=inp.index, image=emb[ok], image_id=kept_ids, image_norm=image_norm[ok], text=text,
            sample_id=np.array([r[0] for r in text_rows], np.int64),
            text_image_id=np.array([r[2] for r in text_rows], np.int64), text_norm=text_norm, rejects=rejects,
            image_views=views[ok] if views is not None else None,
            view_params=params[ok] if params is not None else None,
            lone_text=lone_text, lone_sample_id=np.array([sid for sid, _ in inp.lone], np.int64) if inp.index == 0
            else None,
        )

    def _images(self, inp: ShardInput, progress: Progress) -> tuple:
        """-> (embeddings, ok mask, norms, failures) for a shard's images, encoding only the unknown ones."""
        n, width = len(inp.locations), self.teacher.width
        emb = np.zeros((n, width), dtype=self.dtype)
        norms = np.zeros(n, np.float32)
        ok = np.zeros(n, dtype=bool)
        known_rows = [self.known_images.get(int(i)) for i in inp.image_ids]
        have = np.array([r is not None for r in known_rows], dtype=bool)
        if have.any():
            rows = np.array([r for r in known_rows if r is not None], dtype=np.int64)
            emb[have], norms[have], ok[have] = self.known.image_unit[rows], self.known.image_norm[rows], True
            progress(int(have.sum()))
        todo = np.flatnonzero(~have)
        sub_norms = np.zeros(len(todo), np.float32)
        sub, sub_ok, sub_failures = encode_image_locations(
            self.teacher, [inp.locations[i] for i in todo], self.batch_size, self.num_workers, dtype=self.dtype,
            on_progress=progress, norms_out=sub_norms, device_preprocess=self.device_preprocess, clock=self.clock)
        emb[todo], norms[todo], ok[todo] = sub, sub_norms, sub_ok
        return emb, ok, norms, [(int(todo[p]), reason) for p, reason in sub_failures]

    def _views(self, inp: ShardInput, ok: np.ndarray, progress: Progress) -> tuple[np.ndarray, np.ndarray, list]:
        """-> (views (n, K, D), params (n, K, 5), failures); an image whose view fails is a failure as a whole
        (its row would otherwise hold a zero target)."""
        spec, K, width = self.views, self.views.count, self.teacher.width
        transform = teacher_view_transform(self.teacher)
        params = (np.stack([spec.params(int(i)) for i in inp.image_ids]) if len(inp.image_ids)
                  else np.zeros((0, K, 5), np.float32))
        todo = np.flatnonzero(ok)
        locs = [inp.locations[i] for i in todo for _ in range(K)]
        transforms = [BoundView(transform, params[i, k]) for i in todo for k in range(K)]
        flat, _, flat_failures = encode_image_locations(
            self.teacher, locs, self.batch_size, self.num_workers, dtype=self.dtype, on_progress=progress,
            transforms=transforms, clock=self.clock)
        views = np.zeros((len(inp.locations), K, width), dtype=self.dtype)
        views[todo] = flat.reshape(len(todo), K, width)
        failures = {}
        for pos, reason in flat_failures:
            failures.setdefault(int(todo[pos // K]), f"view {pos % K}: {reason}")
        return views, params, sorted(failures.items())

    def _captions(self, captions: list[str], progress: Progress) -> tuple[np.ndarray, np.ndarray]:
        """-> (embeddings, norms) of captions, encoding only those the teacher does not know."""
        width = self.teacher.width
        out = np.zeros((len(captions), width), dtype=self.dtype)
        norms = np.zeros(len(captions), np.float32)
        rows = [self.known_captions.get(c) for c in captions]
        have = np.array([r is not None for r in rows], dtype=bool)
        if have.any():
            idx = np.array([r for r in rows if r is not None], dtype=np.int64)
            out[have], norms[have] = self.known.text_unit[idx], self.known.text_norm[idx]
            progress(int(have.sum()))
        todo = np.flatnonzero(~have)
        sub_norms = np.zeros(len(todo), np.float32)
        out[todo] = encode_captions(self.teacher, [captions[i] for i in todo], self.text_batch_size, self.dtype,
                                    progress, norms_out=sub_norms)
        norms[todo] = sub_norms
        return out, norms


__all__ = ["FeatureMapper"]
