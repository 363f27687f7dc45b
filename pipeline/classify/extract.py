"""Teacher image token features and text embeddings for the token cache (method.md 4, step 1 inputs).

Per teacher backend: ``lit`` -> EfficientNet-Lite0's last feature map (``extract_features``, 7x7x1280 at
224 px) as 49 tokens; open_clip ViT -> the patch tokens after ``ln_post``; Hugging Face CLIP -> patch tokens
of the vision model (CLS dropped), SigLIP -> all its patch tokens; ``dual:`` (a trained dual encoder with a timm
image tower) -> its last feature map (CNN) or output tokens (ViT). ``pooled`` is what the text-free linear
probe reads: the 1280-d tower feature for ``lit`` (the LiT head's input), the projected image embedding
(before normalisation) for open_clip and Hugging Face teachers.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.common.precision import autocast
from pipeline.features.encode import encode_captions
from pipeline.common.errors import PipelineError
from pipeline.data.loader import iter_image_batches
from pipeline.data.manifest import Manifest, Reject, write_rejects
from pipeline.classify.store import (
    TokenMeta,
    TokenSplit,
    TokenWriter,
    images_digest,
    prompts_path,
    split_path,
    write_prompts,
)
from pipeline.teachers.base import Teacher

# pixels -> (tokens (B, T, C), pooled (B, P), L2-normalised embedding (B, D)), all float32
Extract = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _is(teacher: Teacher, module: str, cls: str) -> bool:
    """isinstance without importing a backend that was never loaded (open_clip takes seconds to import)."""
    mod = sys.modules.get(module)
    return mod is not None and isinstance(teacher, getattr(mod, cls))


def token_extractor(teacher: Teacher) -> tuple[Extract, dict]:
    """(extract function, image architecture spec for a fresh student of the same kind)."""
    if _is(teacher, "pipeline.teachers.lit", "LitTeacher"):
        return _lit(teacher), {"kind": "timm", "name": "tf_efficientnet_lite0", "kwargs": {}}
    if _is(teacher, "pipeline.teachers.openclip", "OpenClipTeacher"):
        return _openclip(teacher)
    if _is(teacher, "pipeline.teachers.hf", "HFTeacher"):
        return _hf(teacher)
    if _is(teacher, "pipeline.students.export", "StudentEncoder"):
        return _dual(teacher)
    raise PipelineError(
        f"token features are implemented for lit, open_clip ViT, hf and dual: (timm image tower) teachers, not "
        f"{type(teacher).__name__}"
    )


def _lit(teacher) -> Extract:

    towers, heads = teacher.towers, teacher.heads

    @torch.no_grad()
    def extract(pixels: torch.Tensor):
        pixels = pixels.to(teacher.device)
        with autocast(teacher.device):
            fmap = towers.image_tower.extract_features(pixels)
        tokens = fmap.float().flatten(2).transpose(1, 2)  # (B, H*W, 1280)
        pooled = tokens.mean(1)  # = LitTowers.image_features: mean over spatial positions
        return tokens, pooled, F.normalize(heads.image(pooled), dim=-1)

    return extract


def _openclip(teacher) -> tuple[Extract, dict]:

    visual = teacher.model.visual
    if not hasattr(visual, "output_tokens"):
        raise PipelineError(f"open_clip teacher {teacher.arch}: token features need a ViT image tower")

    @torch.no_grad()
    def extract(pixels: torch.Tensor):
        before = visual.output_tokens
        visual.output_tokens = True
        try:
            with autocast(teacher.device, teacher.precision):
                pooled, tokens = visual(pixels.to(teacher.device))
        finally:
            visual.output_tokens = before
        pooled = pooled.float()
        return tokens.float(), pooled, F.normalize(pooled, dim=-1)

    cfg = teacher.model_cfg
    arch = {
        "kind": "open_clip",
        "name": "",
        "kwargs": {
            "embed_dim": cfg["embed_dim"],
            "vision_cfg": cfg["vision_cfg"],
            **({"quick_gelu": True} if cfg.get("quick_gelu") else {}),
            "preprocess_cfg": {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in teacher.preprocess_cfg.items()
                if k in ("mean", "std")
            },
        },
    }
    return extract, arch


def _dual(teacher) -> tuple[Extract, dict]:
    """A dual encoder this project trained (``dual:EXPORT``, e.g. the strong emoji teacher) with a timm image
    tower: a CNN's last feature map as H*W tokens, or a ViT's output tokens; ``pooled`` is the tower's pooled
    feature (timm's pre-logits), the projection's input."""
    model = teacher.model
    spec, tower = model.config.image, model.image_tower
    if spec.kind != "timm" or not hasattr(tower, "forward_features"):
        raise PipelineError(f"token features of a dual: teacher need a timm image tower, not {spec.kind} {spec.name}")

    @torch.no_grad()
    def extract(pixels: torch.Tensor):
        pixels = pixels.to(teacher.device)
        if model.config.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        fmap = tower.forward_features(pixels)
        pooled = tower.forward_head(fmap, pre_logits=True).float()
        tokens = fmap.float().flatten(2).transpose(1, 2) if fmap.ndim == 4 else fmap.float()
        return tokens, pooled, F.normalize(model.image_proj(pooled), dim=-1)

    return extract, {"kind": "timm", "name": spec.name, "kwargs": dict(spec.kwargs)}


def _hf(teacher) -> tuple[Extract, dict]:

    model = teacher.model

    @torch.no_grad()
    def extract(pixels: torch.Tensor):
        with autocast(teacher.device, teacher.precision):
            out = model.vision_model(pixel_values=pixels.to(teacher.device))
            pooled = out.pooler_output if teacher.is_siglip else model.visual_projection(out.pooler_output)
        hidden = out.last_hidden_state.float()
        tokens = hidden if teacher.is_siglip else hidden[:, 1:]  # CLIP: drop the class token
        pooled = pooled.float()
        return tokens, pooled, F.normalize(pooled, dim=-1)

    p = teacher.processor
    arch = {
        "kind": "hf",
        "name": model.config.vision_config.model_type,
        "kwargs": {
            "config": model.config.vision_config.to_dict(),
            "mean": list(p.image_mean),
            "std": list(p.image_std),
        },
    }
    return extract, arch


@dataclass
class TokenSummary:
    split: str
    path: Path
    images: int = 0
    captions: int = 0
    rejects: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: bool = False
    shape: tuple = field(default_factory=tuple)  # (T, C) per image


def cache_split_tokens(
    teacher: Teacher,
    manifest: Manifest,
    split: str,
    out_dir: str | Path,
    *,
    captions: bool = True,
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
) -> TokenSummary:
    """Write ``<out_dir>/<split>.h5`` for the manifest's images (and captions); skip it when already made."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    image_ids, paths = manifest.unique_images()
    if len(image_ids) == 0:
        raise PipelineError(f"split {split} has no images")
    digest = images_digest(image_ids, paths)
    path = split_path(out_dir, split)
    fingerprint = teacher.fingerprint()
    if path.exists():
        done = TokenSplit(path)
        if done.meta.teacher_fingerprint != fingerprint or done.meta.images_digest != digest:
            raise PipelineError(
                f"{path} exists but was made from other images or another teacher; "
                "delete it or choose another tokens_dir"
            )
        if done.has_captions or not captions:
            return TokenSummary(
                split,
                path,
                len(done),
                len(getattr(done, "caption_sample_ids", ())),
                int(len(image_ids) - len(done)),
                done.nbytes,
                time.perf_counter() - started,
                skipped=True,
                shape=(done.meta.n_tokens, done.meta.token_dim),
            )
        path.unlink()  # made without captions, now wanted: redo (the images are the expensive part anyway)

    extract, arch = token_extractor(teacher)
    locations = [manifest.resolve(p) for p in paths]
    writer: TokenWriter | None = None
    rejects: list[Reject] = []
    bar = tqdm(total=len(locations), unit="img", desc=f"tokens {split}", disable=not progress)
    try:
        for batch in iter_image_batches(
            locations, teacher.image_transform(), batch_size, workers, teacher.device.type == "cuda"
        ):
            for pos, reason in batch.failures:
                rejects.append(Reject(f"image_id={image_ids[pos]}", reason, paths[pos]))
            if batch.pixels is not None:
                tokens, pooled, emb = extract(batch.pixels)
                if writer is None:
                    meta = TokenMeta(
                        fingerprint,
                        teacher.name,
                        digest,
                        split,
                        int(tokens.shape[1]),
                        int(tokens.shape[2]),
                        int(pooled.shape[1]),
                        int(emb.shape[1]),
                        json.dumps(arch),
                    )
                    writer = TokenWriter(path, meta, image_ids)
                writer.write(
                    np.asarray(batch.positions), tokens.cpu().numpy(), pooled.cpu().numpy(), emb.cpu().numpy()
                )
            bar.update(len(batch.positions) + len(batch.failures))
        bar.close()
        if writer is None:
            raise PipelineError(f"no image of split {split} could be decoded (e.g. {rejects[0].reason})")
        ok = set(image_ids[writer.valid].tolist())
        n_captions = 0
        if captions:
            t = manifest.table
            rows = [
                (s, i, c)
                for s, i, c in zip(
                    t.column("sample_id").to_pylist(),
                    t.column("image_id").to_pylist(),
                    t.column("caption").to_pylist(),
                )
                if i in ok and c and c.strip()
            ]
            emb = encode_captions(teacher, [c for _, _, c in rows])
            writer.write_captions(emb, np.array([r[0] for r in rows]), np.array([r[1] for r in rows]))
            n_captions = len(rows)
        n_ok = len(ok)
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    write_rejects(rejects, path.with_name(f"{split}.rejects.parquet"))
    return TokenSummary(
        split,
        path,
        n_ok,
        n_captions,
        len(rejects),
        path.stat().st_size,
        time.perf_counter() - started,
        shape=(meta.n_tokens, meta.token_dim),
    )


def check_templates(templates: list[str]) -> list[str]:
    if not templates:
        raise PipelineError("give at least one class-prompt template, e.g. 'a photo of a {label}.'")
    for t in templates:
        if "{label}" not in t:
            raise PipelineError(f"prompt template {t!r} has no {{label}} placeholder")
    return list(templates)


def cache_prompts(teacher: Teacher, classes: list[str], templates: list[str], out_dir: str | Path) -> Path:
    """(K, D) class-prompt embeddings: each template's embedding, averaged over templates, re-normalised."""
    templates = check_templates(templates)
    path = prompts_path(Path(out_dir), classes, templates)
    if path.exists():
        return path
    per_template = [encode_captions(teacher, [t.format(label=c) for c in classes]) for t in templates]
    emb = F.normalize(torch.from_numpy(np.mean(per_template, axis=0)), dim=-1).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_prompts(path, emb, classes, templates, teacher.fingerprint())


__all__ = ["token_extractor", "cache_split_tokens", "cache_prompts", "check_templates", "TokenSummary"]
