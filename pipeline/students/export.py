"""Exported students: one self-contained file, loadable as a ``Teacher`` for stage-3 evaluation.

The file holds the state dict, the *resolved* config (no references to weight files or pretrained
directories), the tokenizer's own files and the transform settings, so loading needs only the
architecture code (timm / transformers / open_clip), not the training code or the original assets.
"""

from __future__ import annotations

import importlib.metadata
import math
import warnings
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import nn

from pipeline.common import io
from pipeline.common.errors import PipelineError, first_line
from pipeline.students.config import StudentConfig
from pipeline.students.model import StudentModel, build_student
from pipeline.students.preprocess import TransformSettings, tokenizer_from_settings, tokenizer_settings
from pipeline.students.towers import quiet_transformers
from pipeline.teachers.base import Teacher, state_dict_digest

EXPORT_FORMAT = "clipdistill-student/1"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "timm", "transformers", "open_clip_torch"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def unwrap(model: nn.Module) -> StudentModel:
    """The ``StudentModel`` inside DistributedDataParallel and/or ``torch.compile`` wrappers."""
    for _ in range(3):
        model = getattr(model, "_orig_mod", model)  # torch.compile
        model = getattr(model, "module", model)  # (Distributed)DataParallel
    if not isinstance(model, StudentModel):
        raise PipelineError(f"expected a StudentModel, got {type(model).__name__}")
    return model


def export_student(
    model: StudentModel, config: StudentConfig | None, path: str | Path, meta: dict | None = None
) -> Path:
    """Write ``model`` to ``path`` atomically; ``meta`` (e.g. teacher fingerprint, metrics) is stored as is.

    ``config`` defaults to ``model.config`` and must describe the model (the projections' width is checked).
    """
    model = unwrap(model)
    config = config or model.config
    if config.embed_dim != model.embed_dim:
        raise PipelineError(f"export config width {config.embed_dim} != model width {model.embed_dim}")
    resolved = StudentConfig.from_dict({**model.resolved_config.to_dict(), "name": config.name})
    payload = {
        "format": EXPORT_FORMAT,
        "config": resolved.to_dict(),
        "source_config": config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "tokenizer": tokenizer_settings(model.tokenizer),
        "transform": model.transform_settings.to_dict(),
        "meta": meta or {},
        "versions": _versions(),
    }
    with io.atomic_path(path, checksum=True) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _read(path: str | Path, mmap: bool = False, verify: bool = True) -> dict:
    from pipeline.train.state import load_checkpoint

    payload = load_checkpoint(Path(path), "student export", mmap=mmap, verify=verify)
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise PipelineError(f"{path} is not a student export (expected format {EXPORT_FORMAT})")
    return payload


def export_meta(path: str | Path) -> dict:
    """The export's ``meta`` (teacher fingerprint, dataset, run) without reading its weights into memory."""
    return _read(path, mmap=True, verify=False).get("meta", {})  # not hashed twice: loading it checks


def load_student_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[StudentModel, dict]:
    """The exported ``StudentModel`` (eval mode) and the export's ``meta`` dict."""
    payload = _read(path)
    config = StudentConfig.from_dict(payload["config"])
    tokenizer = tokenizer_from_settings(payload["tokenizer"])
    model = build_student(config, tokenizer=tokenizer, load_weights=False)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise PipelineError(f"{path}: weights do not fit the stored config: {first_line(exc)}") from exc
    # Stored settings win over the rebuilt ones: normalisation constants may differ between timm versions.
    model.transform_settings = TransformSettings.from_dict(payload["transform"])
    return model.to(device).eval(), payload.get("meta", {})


TRAIN_ONLY_CONFIG = ("train_color_jitter", "train_grayscale")
TRAIN_ONLY_TRANSFORM = ("color_jitter", "grayscale")


class StudentEncoder(Teacher):
    """A trained student behind the ``Teacher`` interface, so stage 3 evaluates both the same way.

    Wrapping puts ``model`` in eval mode (a trainer evaluating mid-run calls ``model.train()`` after);
    gradients are off inside ``encode_*`` already, so ``requires_grad`` flags are left alone.
    """

    def __init__(self, model: StudentModel, name: str | None = None, meta: dict | None = None):
        self.model = model.eval()
        self.name = name or f"student-{model.config.name}"
        self.width = model.embed_dim
        self.meta = meta or {}
        self.device = next(model.parameters()).device

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self.model.image_transform(train=False)

    def tensor_preprocess(self):
        from pipeline.teachers.preprocess import INTERPOLATIONS, TensorPreprocess

        s = self.model.transform_settings  # eval: ImageTransform's Resize(floor(size / crop_pct)) + CenterCrop(size)
        if s.interpolation not in INTERPOLATIONS:
            return None
        return TensorPreprocess(math.floor(s.size / s.crop_pct), s.size, s.interpolation, s.mean, s.std)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.model.tokenizer(texts)

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.image_features(pixels)

    def _encode_texts(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.text_features(tokens)

    @torch.no_grad()
    def image_tokens(self, pixels: torch.Tensor):
        """A timm image tower's last feature map as H*W tokens (CNN) or its output tokens (ViT); pooled = the
        tower's pre-logits feature, the projection's input."""
        self.token_arch()  # refuses a tower without tokens
        model, tower = self.model, self.model.image_tower
        pixels = pixels.to(self.device)
        if model.config.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        fmap = tower.forward_features(pixels)
        pooled = tower.forward_head(fmap, pre_logits=True).float()
        tokens = fmap.float().flatten(2).transpose(1, 2) if fmap.ndim == 4 else fmap.float()
        return tokens, pooled, nn.functional.normalize(model.image_proj(pooled), dim=-1)

    def token_arch(self) -> dict:
        spec = self.model.config.image
        if spec.kind != "timm" or not hasattr(self.model.image_tower, "forward_features"):
            raise PipelineError(f"token features of a dual: teacher need a timm image tower, not {spec.kind} "
                                f"{spec.name}")
        return {"kind": "timm", "name": spec.name, "kwargs": dict(spec.kwargs)}

    def fingerprint_parts(self) -> dict:
        config, transform = self.model.resolved_config.to_dict(), self.model.transform_settings.to_dict()
        # Training-only photometric augmentation never changes what the encoder computes (the weights digest covers
        # its effect on training), and fingerprints from before these fields existed must keep matching their caches.
        for key in TRAIN_ONLY_CONFIG:
            config.pop(key, None)
        for key in TRAIN_ONLY_TRANSFORM:
            transform.pop(key, None)
        return {
            "weights": state_dict_digest(self.model),
            "config": config,
            "transform": transform,
            "tokenizer": self.model.tokenizer.settings(),
        }


class DualEncoderTeacher(StudentEncoder):
    """``dual:EXPORT``: a dual encoder this project trained (architecture of a student preset, fine-tuned on
    pairs; ``make teacher``) used as a teacher. The export's meta carries its recipe and training-data hash."""

    @classmethod
    def from_spec(cls, arg: str) -> "DualEncoderTeacher":
        if not arg:
            raise PipelineError("teacher spec dual:EXPORT needs the export's path, e.g. "
                                "dual:artifacts/teachers/emoji-strong.pt (make teacher)")
        model, meta = load_student_model(arg)
        return cls(model, name=f"dual-{model.config.name}", meta=meta)


def load_student(path: str | Path, device: str | torch.device = "cpu") -> StudentEncoder:
    """Load an export written by ``export_student`` as a ``Teacher``-compatible encoder."""
    model, meta = load_student_model(path, device)
    return StudentEncoder(model, meta=meta)


# ---- TorchScript -------------------------------------------------------------------------------------


class _ImageEncoder(nn.Module):
    def __init__(self, model: StudentModel):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


class _TextEncoder(nn.Module):
    def __init__(self, model: StudentModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text({"input_ids": input_ids, "attention_mask": attention_mask})


def export_torchscript(model: StudentModel, out_dir: str | Path) -> tuple[Path, Path]:
    """Trace both encoders to ``image_encoder.pt`` and ``text_encoder.pt`` in ``out_dir``.

    Limits: the image encoder takes (B, 3, S, S) pixels already run through the eval transform (S =
    ``config.image_size``); the text encoder takes ``input_ids``/``attention_mask`` padded to exactly
    ``config.max_text_len`` (``model.tokenizer(texts, pad_to_max=True)``), because tracing records one
    sequence length and one masking branch. Tokenisation and image preprocessing are not included.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = unwrap(model).eval()
    device = next(model.parameters()).device
    size = model.config.image_size
    pixels = torch.zeros(2, 3, size, size, device=device)
    # Trace with a padded caption so the masked attention path is the one recorded.
    tokens = model.tokenizer(["a", "an example caption"], pad_to_max=True)
    tokens = {k: v.to(device) for k, v in tokens.items()}
    paths = out_dir / "image_encoder.pt", out_dir / "text_encoder.pt"
    try:
        # torch.jit is deprecated in recent torch (FutureWarning) and tracing warns about every Python
        # branch on tensor values; both are expected here (see the limits above).
        with torch.no_grad(), warnings.catch_warnings(), quiet_transformers():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            image = torch.jit.trace(_ImageEncoder(model), (pixels,), check_trace=False)
            text = torch.jit.trace(_TextEncoder(model), (tokens["input_ids"], tokens["attention_mask"]),
                                   check_trace=False, strict=False)
    except Exception as exc:  # tracing fails in many ways for unsupported tower code
        raise PipelineError(f"TorchScript tracing failed for this student: {first_line(exc)}") from exc
    for module, path in zip((image, text), paths):
        with io.atomic_path(path, checksum=True) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(module, str(tmp))
    return paths


def load_torchscript(path: str | Path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """A traced encoder written by ``export_torchscript``, after its checksum is checked (a TorchScript file is
    code: a changed one is never run)."""
    io.verify_file(path, "TorchScript encoder")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError, OSError) as exc:
        raise PipelineError(f"cannot read TorchScript encoder {path}: {first_line(exc)}") from None
