"""CD: contrastive distillation against a queue of teacher negatives (method.md 1.1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.common.errors import PipelineError
from pipeline.distill.losses.common import LossInputs, _check_pair, _f32, _ids
from pipeline.train.contrastive import false_negative_mask


def queue_contrastive(
    anchor: Tensor,
    positive: Tensor,
    queue: Tensor,
    tau: float,
    neg_mask: Tensor | None = None,
) -> Tensor:
    """Mean over rows of CE([a.p, a.q_1..a.q_K] / tau, target 0), masked negatives excluded (method.md 1.1).

    Args:
        anchor: (B, D) student embeddings.
        positive: (B, D) matching teacher embeddings.
        queue: (K, D) teacher negatives; K may be 0 (the loss is then exactly 0).
        tau: temperature.
        neg_mask: optional (B, K) bool, True = drop that negative for that row.
    """
    a, p, q = _f32(anchor), _f32(positive), _f32(queue)
    pos = (a * p).sum(dim=1, keepdim=True)
    neg = a @ q.t()
    if neg_mask is not None:
        # -inf keeps the softmax exact; the positive column is finite, so no row is all -inf.
        neg = neg.masked_fill(neg_mask, float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / tau
    # CE with target 0 == logsumexp(logits) - logits[:, 0]
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


class ContrastiveDistillLoss(nn.Module):
    """Contrastive distillation against a queue of teacher negatives (method.md 1.1).

    Returns ``{"cd_img", "cd_txt", "cd"}``; with ``cross_modal=True`` also ``"cd_img2txt"`` (student image
    vs own teacher caption + teacher text queue) and ``"cd_txt2img"`` (student text vs own teacher image +
    teacher image queue), all summed into ``"cd"``.

    Masking: image-queue entries with the row's image_id; text-queue entries with the row's image_id or,
    when both hash arrays are given, the row's caption hash. Only queue entries are negatives (the
    current batch enters the queue after the step, as in MoCo), so there is no in-batch mask here.
    """

    def __init__(self, tau: float = 0.05, cross_modal: bool = False) -> None:
        super().__init__()
        if tau <= 0:
            raise PipelineError(f"contrastive temperature tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.cross_modal = bool(cross_modal)

    def forward(
        self,
        s_img: Tensor,
        s_txt: Tensor,
        t_img: Tensor,
        t_txt: Tensor,
        img_ids: Tensor,
        queue_img: Tensor,
        queue_txt: Tensor,
        queue_img_ids: Tensor,
        queue_txt_ids: Tensor,
        captions_hash: Tensor | None = None,
        queue_txt_hash: Tensor | None = None,
        all_images: tuple[Tensor, Tensor, Tensor] | None = None,
        all_texts: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = None,
    ) -> dict[str, Tensor]:
        """``all_images``: (student, teacher, ids) of every image of the step, pairs' and transfer images, for
        the image term (default: the pairs' images); ``all_texts`` likewise (with caption hashes) for the text
        term; the cross-modal terms use the pairs only."""
        _check_pair(s_img, t_img, "contrastive distillation (image)")
        _check_pair(s_txt, t_txt, "contrastive distillation (text)")
        dev = s_img.device
        ids = _ids(img_ids, dev)
        qi_ids, qt_ids = _ids(queue_img_ids, dev), _ids(queue_txt_ids, dev)
        h, qh = _ids(captions_hash, dev), _ids(queue_txt_hash, dev)
        for q, q_ids in ((queue_img, qi_ids), (queue_txt, qt_ids)):
            if q.ndim != 2 or q.shape[1] != s_img.shape[1] or q.shape[0] != q_ids.shape[0]:
                raise PipelineError(f"contrastive distillation: queue of shape {tuple(q.shape)} with "
                                    f"{q_ids.shape[0]} ids does not fit embeddings of width {s_img.shape[1]}")

        img_mask = false_negative_mask(ids, qi_ids)
        txt_mask = false_negative_mask(ids, qt_ids, h, qh)
        all_s, all_t, all_mask = s_img, t_img, img_mask
        if all_images is not None and len(all_images[0]) != len(s_img):
            all_s, all_t, all_ids = all_images
            _check_pair(all_s, all_t, "contrastive distillation (all images)")
            all_mask = false_negative_mask(_ids(all_ids, dev), qi_ids)
        out = {
            "cd_img": queue_contrastive(all_s, all_t, queue_img, self.tau, all_mask),
            "cd_txt": self._text_term(s_txt, t_txt, txt_mask, queue_txt, qt_ids, qh, all_texts),
        }
        if self.cross_modal:
            # An image's false negatives among captions are the same as its caption's (same image or
            # identical caption); a caption's among images are those of its own image.
            out["cd_img2txt"] = queue_contrastive(s_img, t_txt, queue_txt, self.tau, txt_mask)
            out["cd_txt2img"] = queue_contrastive(s_txt, t_img, queue_img, self.tau, img_mask)
        out["cd"] = torch.stack(list(out.values())).sum()
        return out

    def _text_term(self, s_txt, t_txt, txt_mask, queue_txt, qt_ids, qh, all_texts) -> Tensor:
        if all_texts is None or len(all_texts[0]) == len(s_txt):
            return queue_contrastive(s_txt, t_txt, queue_txt, self.tau, txt_mask)
        all_s, all_t, all_ids, all_h = all_texts
        _check_pair(all_s, all_t, "contrastive distillation (all captions)")
        dev = all_s.device
        mask = false_negative_mask(_ids(all_ids, dev), qt_ids, _ids(all_h, dev), qh)
        return queue_contrastive(all_s, all_t, queue_txt, self.tau, mask)

    def of(self, x: LossInputs) -> dict[str, Tensor]:
        if x.queue is None:
            raise PipelineError("contrastive distillation is enabled but no negative queue was given")
        q = x.queue
        return self(x.s_img, x.s_txt, x.t_img, x.t_txt, x.img_ids, q.img, q.txt, q.img_ids, q.txt_ids,
                    x.captions_hash, q.txt_hash, all_images=x.images(), all_texts=x.texts())
