"""Step 2 (method.md 4): train one student generation against soft targets, and what it reports.

The student sees only images: cross-entropy against the previous teacher's per-image soft targets (the
head, the linear probe, or the previous generation), optionally plus hard-label cross-entropy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.common.precision import autocast
from pipeline.retrieval.metrics import recall_at_k
from pipeline.classify.config import ClassifyConfig
from pipeline.classify.losses import soft_cross_entropy
from pipeline.classify.metrics import topk_accuracy
from pipeline.classify.objective import LoopResult, LoopSettings, epoch_order, fit
from pipeline.train.state import seed_all
from pipeline.classify.student import ImageClassifier, ImageRows, epoch_loader, predict
from pipeline.classify.splits import Split


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Targets at temperature T: p^(1/T) renormalised (= softmax(logits / T) for probabilities p)."""
    if temperature == 1.0:
        return probs
    logp = np.log(np.clip(probs, 1e-12, None)) / temperature
    logp -= logp.max(1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(1, keepdims=True)


def new_student(cfg: ClassifyConfig, arch: dict, num_classes: int, generation: int) -> ImageClassifier:
    d = cfg.distill
    seed_all(cfg.seed + generation)  # every generation starts afresh (its own random classifier / encoder init)
    return ImageClassifier(
        arch, d.image_size, num_classes, d.train_crop_scale, d.hflip, d.channels_last, d.init_weights
    )


def student_loss(
    model: ImageClassifier,
    pixels: torch.Tensor,
    soft: torch.Tensor,
    temperature: float,
    precision: str = "auto",
    labels: Optional[torch.Tensor] = None,
    labelled: Optional[torch.Tensor] = None,
    label_weight: float = 0.0,
) -> torch.Tensor:
    """A generation's loss on one batch: soft cross-entropy against its teacher's targets (B, K), plus
    ``label_weight`` x hard-label cross-entropy on the ``labelled`` rows (bool mask)."""
    device = next(model.parameters()).device
    with autocast(device, precision):
        logits = model(pixels.to(device, non_blocking=True))
    logits = logits.float()  # the losses in full precision
    loss = soft_cross_entropy(logits, soft.to(device), temperature)
    if label_weight > 0 and labelled is not None and labelled.any():
        loss = loss + label_weight * F.cross_entropy(logits[labelled.to(device)], labels[labelled].to(device))
    return loss


def train_generation(
    cfg: ClassifyConfig,
    run_dir: Path,
    model: ImageClassifier,
    generation: int,
    train: Split,
    data: ImageRows,
    targets: np.ndarray,
    known: Optional[np.ndarray],
    val: Optional[Split],
    device: torch.device,
    resume: bool,
    progress: bool,
) -> LoopResult:
    """Fit ``model`` (in place) on the training images against ``targets`` (N, K).

    ``known``: positions of training images whose label the teachers were allowed to see (few-shot);
    only they get the hard-label term when ``distill.label_weight`` > 0.
    """
    d = cfg.distill
    soft = torch.from_numpy(sharpen(targets, d.temperature)).float()
    labels = torch.from_numpy(train.images.labels)
    has_label = torch.zeros(len(train), dtype=torch.bool)
    has_label[torch.as_tensor(np.arange(len(train)) if known is None else known)] = True
    bs = min(d.batch_size, len(train))
    seed = cfg.seed + generation
    model.to(device)
    loader, sampler = epoch_loader(data, bs, d.workers)

    def batches(epoch: int, start: int):
        sampler.epoch, sampler.order = epoch, epoch_order(len(train), seed, epoch)[start * bs :]
        yield from loader

    def loss_fn(batch) -> torch.Tensor:
        rows, pixels = batch
        if pixels is None:  # a whole batch of undecodable images: nothing to learn, zero loss keeps order
            return torch.zeros((), device=device, requires_grad=True)
        mask = has_label[rows] if d.label_weight > 0 else None
        return student_loss(model, pixels, soft[rows], d.temperature, cfg.precision, labels[rows], mask,
                            d.label_weight)

    def evaluate() -> dict:
        logits, _, ok = predict(model, val.images.locations, cfg.eval_batch_size, cfg.data.workers, cfg.precision)
        return topk_accuracy(torch.from_numpy(logits[ok]), torch.from_numpy(val.images.labels[ok]))

    settings = LoopSettings(d.epochs, len(train) // bs, d.lr, d.weight_decay, warmup_steps=d.warmup_steps,
                            grad_clip=d.grad_clip, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                            max_steps=cfg.max_steps, score="top1",
                            desc=f"gen {generation}")
    return fit(run_dir, model, settings, seed, batches, loss_fn, evaluate if val is not None else None, resume,
               progress)


def fit_linear_map(
    x: np.ndarray, y: np.ndarray, ridge: float = 1e-2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge regression y ~ ((x - mu) / sd) W on standardised features; returns (mu, sd, W)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = torch.from_numpy((x - mu) / sd).double()
    gram = z.T @ z
    lam = ridge * float(torch.diagonal(gram).mean())
    w = torch.linalg.solve(
        gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), z.T @ torch.from_numpy(y).double()
    )
    return mu, sd, w.float().numpy()


def student_retrieval(train_feats: np.ndarray, train: Split, test_feats: np.ndarray, test: Split) -> dict:
    """Image-text Recall@K of a student on ``test``: its features mapped linearly (fit on the training
    images) into the teacher's embedding space, searched against the teacher's caption embeddings."""
    mu, sd, w = fit_linear_map(train_feats, train.tokens.embedding(train.positions))
    img = torch.nn.functional.normalize(torch.from_numpy(((test_feats - mu) / sd) @ w), dim=-1).numpy()
    return caption_recall(img, test)


def caption_recall(image_emb: np.ndarray, split: Split) -> dict:
    """Recall@1/5/10 + RSUM of image embeddings (rows = the split's images) against its cached captions."""
    index = {int(i): n for n, i in enumerate(split.images.image_ids.tolist())}
    keep = [j for j, i in enumerate(split.tokens.caption_image_ids.tolist()) if int(i) in index]
    idx = np.array([index[int(split.tokens.caption_image_ids[j])] for j in keep], np.int64)
    text = split.tokens.caption_embedding[keep].astype(np.float32)
    r = recall_at_k(np.ascontiguousarray(image_emb, np.float32), text, idx)
    return {k: round(float(v), 2) for k, v in r.items() if k.startswith(("i2t", "t2i", "rsum"))}


__all__ = [
    "sharpen",
    "new_student",
    "student_loss",
    "train_generation",
    "fit_linear_map",
    "student_retrieval",
    "caption_recall",
]
