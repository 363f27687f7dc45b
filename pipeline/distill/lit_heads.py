"""Train the LiT teacher's linear heads contrastively on cached frozen-tower features.

The towers are frozen, so their features are computed once per split (images once per unique image,
every caption) and kept in an npz next to the checkpoint; head training then runs many cheap epochs
of symmetric InfoNCE (CLIP/LiT loss, learnable temperature) over those features. The epoch with the
best held-out RSUM (val manifest, or a held-out slice of the train images) is the one saved.

It lives in distill, above retrieval whose recall it reports: a teacher this project makes is trained here,
like the strong teacher.
"""

from __future__ import annotations

import shutil
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.common import paths
from pipeline.common.runlog import read_metrics
from pipeline.train.loop import LoopSettings, Objective, StepOutput, best_checkpoint, fit
from pipeline.train.state import claim_run_dir, load_checkpoint

from pipeline.common import io
from pipeline.common.errors import PipelineError
from pipeline.retrieval.metrics import recall_at_k
from pipeline.train.contrastive import false_negative_mask, symmetric_infonce
from pipeline.data.manifest import Manifest
from pipeline.teachers.lit import (
    IMAGE_SIZE,
    LitHeads,
    LitTowers,
    image_tower_features,
    save_heads,
    text_tower_features,
    towers_fingerprint_parts,
)
from pipeline.teachers.lit_store import (
    SplitFeatures, cache_key, feature_cache_path, read_features, real_location, write_features,
)

MAX_FAILURES_IN_SUMMARY = 20


def split_features(
    manifest: Manifest,
    cache_path: Path,
    get_towers,
    batch_size: int = 64,
    num_workers: int = 2,
    progress: bool = True,
    image_size: int = IMAGE_SIZE,
) -> tuple[SplitFeatures, bool]:
    """Load the split's tower features from ``cache_path`` if they match, else compute and store them.

    ``get_towers`` is called only when encoding is needed, so a rerun never loads the towers.
    Returns (features, reused).
    """
    key = cache_key(manifest, towers_fingerprint_parts(image_size))
    stored = read_features(cache_path, key)
    if stored is not None:
        return stored, True
    towers = get_towers()
    image_ids, paths = manifest.unique_images()
    feats, ok, failures = image_tower_features(
        towers, [manifest.resolve(p) for p in paths], batch_size, num_workers, progress
    )
    for pos, reason in failures[:5]:
        tqdm.write(f"skipped image {image_ids[pos]}: {reason}")
    captions = manifest.table.column("caption").to_pylist()
    text = text_tower_features(towers, captions, progress=progress)
    sf = SplitFeatures(
        image_ids=image_ids[ok], image_feats=feats,
        row_image_ids=manifest.column("image_id").astype(np.int64), captions=np.asarray(captions, dtype=str),
        text_feats=text,
        failed_ids=np.asarray([image_ids[p] for p, _ in failures], dtype=np.int64),
        failed_reasons=np.asarray([r for _, r in failures], dtype=str),
        image_locations=np.asarray([real_location(manifest.resolve(paths[p])) for p in ok], dtype=str),
    )
    write_features(cache_path, key, sf)
    return sf, False


def _image_index(image_ids: np.ndarray, row_image_ids: np.ndarray) -> np.ndarray:
    """Position in ``image_ids`` of each row's image (every row's image must be present)."""
    order = np.argsort(image_ids)
    return order[np.searchsorted(image_ids, row_image_ids, sorter=order)]


@torch.no_grad()
def evaluate_heads(heads: LitHeads, sf: SplitFeatures, device: torch.device) -> dict[str, float]:
    rows = sf.usable_rows()
    img = F.normalize(heads.image(torch.from_numpy(sf.image_feats).to(device)), dim=-1)
    txt = F.normalize(heads.text(torch.from_numpy(sf.text_feats[rows]).to(device)), dim=-1)
    txt_image = torch.from_numpy(_image_index(sf.image_ids, sf.row_image_ids[rows])).to(device)
    r = recall_at_k(img.cpu().numpy(), txt.cpu().numpy(), txt_image.cpu().numpy())  # the stage-3 metric
    return {k: v for k, v in r.items() if k.startswith(("i2t_", "t2i_", "rsum"))}


def _holdout(sf: SplitFeatures, fraction: float, seed: int) -> tuple[SplitFeatures, SplitFeatures | None]:
    """Split off a fraction of the images (with all their captions) for model selection."""
    ids = sf.image_ids
    n_hold = int(round(fraction * len(ids)))
    if n_hold < 2 or len(ids) - n_hold < 2:
        return sf, None
    held = np.random.default_rng(seed).choice(ids, size=n_hold, replace=False)
    return sf.subset(np.setdiff1d(ids, held)), sf.subset(held)


def _infonce(heads: LitHeads, img: torch.Tensor, txt: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; ``same[i, j]`` marks off-diagonal pairs that are not negatives."""
    zi = F.normalize(heads.image(img), dim=-1)
    zt = F.normalize(heads.text(txt), dim=-1)
    logits = heads.logit_scale.clamp(max=math.log(100.0)).exp() * zi @ zt.T
    i2t, t2i = symmetric_infonce(logits, same)
    return 0.5 * (i2t + t2i)


class LitHeadsObjective(Objective):
    """The LiT heads on the one training loop: symmetric InfoNCE over cached frozen-tower features, batches
    in a seeded per-epoch order (so an interrupted ``build-lit`` resumes exactly), held-out RSUM per epoch."""

    def __init__(self, heads: LitHeads, img_feats: torch.Tensor, txt_feats: torch.Tensor, row_img: torch.Tensor,
                 row_ids: torch.Tensor, cap_ids: torch.Tensor, batch_size: int, weight_decay: float, seed: int,
                 held_out: SplitFeatures | None, device: torch.device):
        self.model = heads
        self.img_feats, self.txt_feats, self.row_img = img_feats, txt_feats, row_img
        self.row_ids, self.cap_ids = row_ids, cap_ids
        self.batch_size, self.weight_decay, self.seed = batch_size, weight_decay, seed
        self.held_out, self.device = held_out, device

    def parameters(self):  # weight decay on the projection matrices only
        named = list(self.model.named_parameters())
        return [{"params": [p for n, p in named if n.endswith("proj.weight")], "weight_decay": self.weight_decay},
                {"params": [p for n, p in named if not n.endswith("proj.weight")], "weight_decay": 0.0}]

    def epoch_batches(self, epoch: int, start: int):
        order = torch.randperm(len(self.txt_feats), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return order.to(self.device).split(self.batch_size)[start:]

    def step(self, batch, step: int) -> StepOutput:
        r, c = self.row_ids[batch], self.cap_ids[batch]
        loss = _infonce(self.model, self.img_feats[self.row_img[batch]], self.txt_feats[batch],
                        false_negative_mask(r, r, c, c))
        return StepOutput(loss, items=len(batch))

    def validate(self):
        if self.held_out is None:
            return None
        self.model.eval()
        return evaluate_heads(self.model, self.held_out, self.device)


def _train_lit_heads(
    train_manifest: str | Path | Manifest,
    out_path: str | Path,
    val_manifest: str | Path | Manifest | None = None,
    width: int = 512,
    epochs: int = 60,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    num_workers: int = 2,
    device: str = "cpu",
    weight_decay: float = 0.05,
    dropout: float = 0.3,
    holdout_fraction: float = 0.1,
    progress: bool = True,
    image_size: int = IMAGE_SIZE,
) -> dict:
    """Compute (or reuse) tower features, train the heads, save the best epoch's checkpoint.

    Without ``val_manifest``, ``holdout_fraction`` of the train images are held out for choosing the
    epoch (none when that leaves fewer than 2 images on either side: the last epoch is kept).
    Training runs in ``<out stem>.run/`` (checkpoints, metrics); a killed run resumes there when its settings
    are the same. Returns the training summary that is also stored in the checkpoint.
    """
    start = time.perf_counter()
    out_path = Path(out_path)
    train = train_manifest if isinstance(train_manifest, Manifest) else Manifest.read(train_manifest)
    val = Manifest.read(val_manifest) if isinstance(val_manifest, (str, Path)) else val_manifest
    if len(train) == 0:
        raise PipelineError("the train manifest has no rows")
    dev = torch.device(device)

    towers: list[LitTowers] = []

    def get_towers() -> LitTowers:
        if not towers:
            towers.append(LitTowers(image_size).to(dev))
        return towers[0]

    tr, tr_reused = split_features(train, feature_cache_path(out_path, "train"), get_towers,
                                   num_workers=num_workers, progress=progress, image_size=image_size)
    failures = list(zip(tr.failed_ids.tolist(), tr.failed_reasons.tolist()))
    va, va_reused = None, True
    if val is not None and len(val):
        va, va_reused = split_features(val, feature_cache_path(out_path, "val"), get_towers,
                                       num_workers=num_workers, progress=progress, image_size=image_size)
        failures += list(zip(va.failed_ids.tolist(), va.failed_reasons.tolist()))
        val_source = "val manifest"
    else:
        tr, va = _holdout(tr, holdout_fraction, seed)
        val_source = f"{holdout_fraction:.0%} of train images held out" if va is not None else "none"
    feature_s = time.perf_counter() - start

    rows = tr.usable_rows()
    if len(rows) < 2:
        raise PipelineError(f"need at least 2 usable training pairs, found {len(rows)} (see image failures)")
    row_img = torch.from_numpy(_image_index(tr.image_ids, tr.row_image_ids[rows])).to(dev)
    img_feats = torch.from_numpy(tr.image_feats).to(dev)
    txt_feats = torch.from_numpy(tr.text_feats[rows]).to(dev)
    # ids for masking false negatives: other captions of the same image, identical caption strings
    row_ids = torch.from_numpy(tr.row_image_ids[rows]).to(dev)
    cap_ids = torch.from_numpy(np.unique(tr.captions[rows], return_inverse=True)[1].reshape(-1)).to(dev)

    torch.manual_seed(seed)  # here, after tower loading, so a rerun from cached features is identical
    heads = LitHeads(width, dropout=dropout, image_size=image_size).to(dev)
    heads.set_input_stats(img_feats, txt_feats)
    steps_per_epoch = math.ceil(len(rows) / batch_size)
    settings = LoopSettings(epochs, steps_per_epoch, lr, weight_decay,
                            warmup_steps=min(epochs * steps_per_epoch // 10, 10 * steps_per_epoch),
                            decay="cosine", log_every=steps_per_epoch, score="rsum", desc="LiT heads",
                            report_val=False)
    objective = LitHeadsObjective(heads, img_feats, txt_feats, row_img, row_ids, cap_ids, batch_size, weight_decay,
                                  seed, va, dev)
    run_dir = out_path.with_name(f"{out_path.stem}.run")
    run_config = {"train": train.content_hash, "val": val.content_hash if val is not None else val_source,
                  "width": width, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                  "weight_decay": weight_decay, "dropout": dropout, "holdout_fraction": holdout_fraction,
                  "image_size": image_size}
    last = paths.last_checkpoint(run_dir)
    resume = last.exists() and load_checkpoint(last).get("config") == run_config
    if last.exists() and not resume:  # another run's leftovers (other data or settings): start over
        for stale in (p for p in run_dir.iterdir() if not p.name.startswith("training.lock")):  # the lock (and its
            # lease renewals and takeover guards) is this process's
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    # One progress line per epoch would be noise here (60 epochs of a few steps): the bar is off.
    result = fit(run_dir, objective, settings, config=run_config, resume=resume, progress=False)
    heads.load_state_dict(best_checkpoint(run_dir)["model"])
    heads.eval()
    history = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run_dir)]

    summary = {
        "width": width, "image_size": image_size, "epochs": epochs, "best_epoch": result.best_epoch + 1, "lr": lr,
        "batch_size": batch_size,
        "weight_decay": weight_decay, "dropout": dropout, "seed": seed, "device": str(dev),
        "temperature": float(1.0 / heads.logit_scale.detach().clamp(max=math.log(100.0)).exp()),
        "train_manifest": {"source": train.source, "content_hash": train.content_hash},
        "train_pairs": int(len(rows)), "train_images": int(len(tr.image_ids)),
        "val_source": val_source,
        "val_pairs": int(len(va.usable_rows())) if va is not None else 0,
        "val_images": int(len(va.image_ids)) if va is not None else 0,
        "val": result.best_val,
        "final_train_loss": _last_train_loss(run_dir),
        "image_failures": len(failures),
        "image_failure_examples": [f"{i}: {r}" for i, r in failures[:MAX_FAILURES_IN_SUMMARY]],
        "feature_cache": "reused" if tr_reused and va_reused else "computed",
        "resumed": resume,
    }
    total_s = time.perf_counter() - start
    summary["time_s"] = {"features": round(feature_s, 2), "training": round(total_s - feature_s, 2),
                         "total": round(total_s, 2)}
    save_heads(out_path, heads.cpu(), summary)
    io.write_json(out_path.with_suffix(".json"), {**summary, "history": history})
    return summary



def train_lit_heads(train_manifest: str | Path | Manifest, out_path: str | Path, *args, **kwargs) -> dict:
    """Compute (or reuse) tower features, train the heads, save the best epoch's checkpoint (``_train_lit_heads``),
    holding ``<stem>.run/training.lock``: a second build-lit of the same checkpoint is refused in one line instead of
    interleaving its epochs and tower features with the first's."""
    out_path = Path(out_path)
    with claim_run_dir(out_path.with_name(f"{out_path.stem}.run")):
        return _train_lit_heads(train_manifest, out_path, *args, **kwargs)


def _last_train_loss(run_dir: Path) -> float | None:
    train = read_metrics(run_dir, "train")
    return train[-1]["loss"] if train else None
