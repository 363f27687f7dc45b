"""Step 1 (method.md 4): the text-conditioned representation head and the text-free linear probe, both
trained on cached teacher features only, and the soft targets they hand to step 2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import torch

from pipeline.common.errors import PipelineError
from pipeline.classify.config import ClassifyConfig
from pipeline.classify.head import LinearProbe, RepresentationHead
from pipeline.classify.metrics import topk_accuracy
from pipeline.classify.objective import LoopSettings, epoch_order, fit
from pipeline.classify.splits import Queries, Split, queries_for
from pipeline.train.state import atomic_save, seed_all
from pipeline.features.cache.tokens import TokenSplit
from pipeline.common import io
from pipeline.features.cache.format import TARGETS_FORMAT
from pipeline.features.cache.integrity import check_file, checksum_attrs


# ---- head -------------------------------------------------------------------------------------------------
def build_head(cfg: ClassifyConfig, tokens: TokenSplit, num_classes: int) -> RepresentationHead:
    h = cfg.head
    return RepresentationHead(
        tokens.meta.token_dim, tokens.meta.width, num_classes, h.dim, h.heads, h.dropout, cfg.text.mode
    )


def _head_rows(q: Queries, n_images: int, subset: Optional[np.ndarray]) -> np.ndarray:
    """Training rows: image indices (prompts) or caption rows (captions), restricted to ``subset`` images."""
    if q.mode == "prompts":
        return np.arange(n_images) if subset is None else np.asarray(subset)
    rows = np.arange(len(q.caption_image))
    return rows if subset is None else rows[np.isin(q.caption_image, subset)]


@torch.no_grad()
def head_probs(head: RepresentationHead, split: Split, q: Queries, batch: int = 256) -> np.ndarray:
    """(N, K) class probabilities per image; with captions, the mean over the image's captions."""
    head.eval()
    device = next(head.parameters()).device
    k = head.num_classes
    if q.mode == "prompts":
        out = np.zeros((len(split), k), np.float32)
        for s in range(0, len(split), batch):
            tok = torch.from_numpy(split.tokens.tokens(split.positions[s : s + batch])).to(device)
            out[s : s + batch] = torch.softmax(head(tok, q.prompts.to(device)), -1).cpu().numpy()
        return out
    sums, counts = np.zeros((len(split), k), np.float64), np.zeros(len(split))
    for s in range(0, len(q.caption_image), batch):
        img = q.caption_image[s : s + batch]
        tok = torch.from_numpy(split.tokens.tokens(split.positions[img])).to(device)
        p = (
            torch.softmax(head(tok, torch.from_numpy(q.caption_emb[s : s + batch]).to(device)), -1)
            .cpu()
            .numpy()
        )
        np.add.at(sums, img, p)
        np.add.at(counts, img, 1)
    if (counts == 0).any():  # an image without a usable caption gets no text: uniform, and it is reported
        sums[counts == 0] = 1.0 / k
        counts[counts == 0] = 1
    return (sums / counts[:, None]).astype(np.float32)


@dataclass
class Step1Inputs:
    """What the head and the probe train on: the run's splits, the training positions they may see (few-shot or
    out-of-fold: a subset; None: all), where, and whether a loop folder is resumed."""

    train: Split
    val: Optional[Split]
    classes: list[str]
    subset: Optional[np.ndarray]
    device: torch.device
    resume: bool = False
    progress: bool = True


def train_part(part: str, cfg: ClassifyConfig, run_dir: Path, inputs: Step1Inputs):
    """-> (model, the training queries or None, loop result) of ``part``: "head" (with text) or "probe"."""
    if part == "head":
        return train_head(cfg, run_dir, inputs)
    model, result = train_probe(cfg, run_dir, inputs)
    return model, None, result


def train_head(cfg: ClassifyConfig, run_dir: Path, inputs: Step1Inputs):
    """Step 1: cross-entropy on class labels, image tokens + text queries from the cache."""
    train, val, classes, device = inputs.train, inputs.val, inputs.classes, inputs.device
    q_train = queries_for(cfg, train, classes)
    q_val = queries_for(cfg, val, classes) if val is not None else None
    seed_all(cfg.seed)  # the head's initialisation is part of the run: the same in every process
    head = build_head(cfg, train.tokens, len(classes)).to(device)
    rows = _head_rows(q_train, len(train), inputs.subset)
    labels = torch.from_numpy(train.images.labels)

    def loss_fn(batch: np.ndarray) -> torch.Tensor:
        img = batch if q_train.mode == "prompts" else q_train.caption_image[batch]
        tok = torch.from_numpy(train.tokens.tokens(train.positions[img])).to(device)
        query = (
            q_train.prompts.to(device)
            if q_train.mode == "prompts"
            else torch.from_numpy(q_train.caption_emb[batch]).to(device)
        )
        return torch.nn.functional.cross_entropy(head(tok, query), labels[img].to(device))

    def evaluate() -> dict:
        return evaluate_probs(head_probs(head, val, q_val), val)

    result = _fit_rows(cfg, cfg.head, "head", run_dir, head, rows, loss_fn,
                       evaluate if val is not None else None, inputs.resume, inputs.progress)
    return head, q_train, result


# ---- probe -----------------------------------------------------------------------------------------------
def train_probe(cfg: ClassifyConfig, run_dir: Path, inputs: Step1Inputs):
    """The text-free teacher: a linear probe on the pooled teacher image features."""
    train, val, classes, subset, device = inputs.train, inputs.val, inputs.classes, inputs.subset, inputs.device
    feats = torch.from_numpy(train.tokens.pooled(train.positions))
    rows = np.arange(len(train)) if subset is None else np.asarray(subset)
    seed_all(cfg.seed)
    probe = LinearProbe(feats.shape[1], len(classes))
    probe.set_input_stats(feats[rows])
    probe.to(device)
    labels = torch.from_numpy(train.images.labels)

    def loss_fn(batch: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(probe(feats[batch].to(device)), labels[batch].to(device))

    def evaluate() -> dict:
        return evaluate_probs(probe_probs(probe, val), val)

    result = _fit_rows(cfg, cfg.probe, "probe", run_dir, probe, rows, loss_fn,
                       evaluate if val is not None else None, inputs.resume, inputs.progress)
    return probe, result


def _fit_rows(cfg: ClassifyConfig, section, desc: str, run_dir: Path, model, rows: np.ndarray, loss_fn,
              evaluate, resume: bool, progress: bool):
    """Train ``model`` on ``rows`` in seeded per-epoch order, full batches only (resumable mid-epoch);
    ``section`` is the config part holding epochs, batch_size, lr and weight_decay."""
    bs = min(section.batch_size, len(rows))

    def batches(epoch: int, start: int):
        order = rows[epoch_order(len(rows), cfg.seed, epoch)]
        for s in range(start * bs, (len(order) // bs) * bs, bs):
            yield order[s : s + bs]

    settings = LoopSettings(section.epochs, len(rows) // bs, section.lr, section.weight_decay,
                            log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, score="top1",
                            desc=desc)
    return fit(run_dir, model, settings, cfg.seed, batches, loss_fn, evaluate, resume, progress)


@torch.no_grad()
def probe_probs(probe: LinearProbe, split: Split) -> np.ndarray:
    probe.eval()
    feats = torch.from_numpy(split.tokens.pooled(split.positions)).to(next(probe.parameters()).device)
    return torch.softmax(probe(feats), -1).cpu().numpy()


# ---- shared ----------------------------------------------------------------------------------------------
def evaluate_probs(probs: np.ndarray, split: Split) -> dict:
    return topk_accuracy(torch.from_numpy(np.asarray(probs)), torch.from_numpy(split.images.labels))


def save_targets(
    path: Path, image_ids: np.ndarray, probs: np.ndarray, classes: list[str], source: str
) -> Path:
    """Soft targets per training image (rows sum to 1), the input of the next student generation."""
    arrays = {"image_id": np.asarray(image_ids, np.int64), "probs": np.asarray(probs, np.float32)}
    with io.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, array in arrays.items():
            f.create_dataset(name, data=array)
        f.attrs.update(checksum_attrs(arrays), classes="\n".join(classes), source=source, format=TARGETS_FORMAT)
    return path


def load_targets(path: Path, image_ids: np.ndarray, classes: list[str]) -> np.ndarray:
    """(N, K) soft targets for ``image_ids`` (in that order)."""
    if not path.is_file():
        raise PipelineError(f"soft targets not found: {path}; run `clipdistill rephead` first")
    check_file(path, "soft targets", "delete it and rerun `clipdistill rephead` / `self-distill` with --resume")
    with h5py.File(path, "r") as f:
        ids, probs, stored = f["image_id"][()], f["probs"][()], f.attrs["classes"].split("\n")
    if stored != classes:
        raise PipelineError(f"{path} was made for other classes; rerun `clipdistill rephead`")
    index = {int(i): n for n, i in enumerate(ids.tolist())}
    missing = [int(i) for i in image_ids if int(i) not in index]
    if missing:
        raise PipelineError(f"{path} has no targets for {len(missing)} training images (e.g. {missing[:3]})")
    return probs[[index[int(i)] for i in image_ids]]


def export_teacher(
    path: Path, model: torch.nn.Module, kind: str, cfg: ClassifyConfig, classes: list[str], meta: dict
) -> Path:
    return atomic_save(
        {
            "format": f"clipdistill-{kind}/1",
            "state_dict": model.state_dict(),
            "classes": classes,
            "head": dataclasses.asdict(cfg.head) if kind == "head" else None,
            "mode": cfg.text.mode,
            "meta": meta,
        },
        path,
    )


__all__ = [
    "Step1Inputs",
    "train_part",
    "build_head",
    "head_probs",
    "train_head",
    "train_probe",
    "probe_probs",
    "evaluate_probs",
    "save_targets",
    "load_targets",
    "export_teacher",
]
