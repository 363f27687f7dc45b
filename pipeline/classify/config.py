"""Config of the classification self-distillation experiment (method.md 4): YAML + ``--set`` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.common.config import to_dict
from pipeline.train.options import RunOptions


@dataclass(frozen=True)
class DataSection:
    manifest_dir: str = "data/openmoji-groups"  # <split>.parquet with a label column
    tokens_dir: str = "artifacts/cache/openmoji/lit/tokens"  # written by teacher-tokens
    train_split: str = "train"
    val_split: str = "val"  # picks the best epoch when it exists
    test_split: str = "test"  # reported
    batch_size: int = 32  # teacher-tokens: images per forward pass
    workers: int = 1  # decoding workers (teacher-tokens and the student's evaluation passes)
    captions: bool = True  # teacher-tokens: also cache caption embeddings (captions mode, retrieval)


@dataclass(frozen=True)
class TextSection:
    mode: str = "prompts"  # prompts (class prompts as queries) | captions (each image's captions)
    templates: tuple = ("a photo of a {label}.",)  # class prompts; embeddings averaged over templates


@dataclass(frozen=True)
class HeadSection:  # step 1, trained on cached features only
    dim: int = 256
    heads: int = 4
    dropout: float = 0.1
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 64


@dataclass(frozen=True)
class ProbeSection:  # the text-free teacher: linear probe on the pooled teacher image feature
    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-3
    batch_size: int = 256


@dataclass(frozen=True)
class DistillSection:  # step 2: fresh image encoder of the teacher's architecture + linear classifier
    generations: int = 2  # gen g+1 learns from gen g ("born-again"); gen 1 from the head / the probe
    teachers: tuple = ("text", "notext")  # text: head targets; notext: linear-probe targets (the baseline)
    arch: dict = field(default_factory=dict)  # override the student encoder: {kind: timm, name: resnet18}
    # "" = random init (method.md 4). Or generic pretrained weights for the student's encoder (e.g.
    # efficientnet-lite2: the ImageNet weights the strong teacher's tower started from, so no knowledge of the
    # task comes with them): small labelled sets are too few images to train a CNN from scratch.
    init_weights: str = ""
    image_size: int = 112  # reduced from the teacher's 224 px for CPU budgets
    epochs: int = 10
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    warmup_steps: int = 50
    temperature: float = 1.0  # targets p^(1/T) renormalised; loss scaled by T^2
    # Out-of-fold soft targets from step 1: K >= 2 also trains the head / probe K times, each without one fold of
    # the training images, and a training image's target comes from the model that did not see it (in-sample
    # targets of a well-fitted head are near one-hot and leave a student generation nothing to learn). 0: off.
    oof_folds: int = 0
    label_weight: float = 0.0  # add this much hard-label cross-entropy on labelled training images
    train_crop_scale: tuple = (0.6, 1.0)
    hflip: float = 0.5
    channels_last: bool = True  # NHWC: 1.46x the NCHW step at Lite2 112 px on CPU (bench/bench_classify_student.py)
    preload: bool = True  # decode every training image once into RAM
    workers: int = 0  # DataLoader workers for training batches (0: in-process, fine with preload)
    grad_clip: float = 5.0


@dataclass(frozen=True)
class ClassifyConfig(RunOptions):
    """The shared run options (name, runs_dir, seed, device, logging, ...) plus the two steps' sections.

    ``precision`` is the student generations' forward passes (auto = bf16 autocast on CUDA, fp32 on CPU, where
    bf16 was no faster: bench/bench_classify_student.py); head and probe train on cached features in fp32.
    ``max_steps`` counts per student generation.
    """

    name: str = "rephead"
    teacher: str = "lit"  # teacher spec, used by teacher-tokens only (steps 1-2 read the token cache)
    data: DataSection = field(default_factory=DataSection)
    text: TextSection = field(default_factory=TextSection)
    head: HeadSection = field(default_factory=HeadSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    distill: DistillSection = field(default_factory=DistillSection)
    few_shot: int = 0  # k labelled training images per class for the head / probe (0: every labelled image)
    retrieval: bool = False  # also report the students' image-text Recall@K on the test split


def comparable(cfg: ClassifyConfig) -> dict:
    """The config minus what may change between invocations of one run: more generations, and settings
    that do not change results (device, workers, batch sizes of inference passes, logging)."""
    d = to_dict(cfg)
    d["distill"].pop("generations")
    d["distill"].pop("workers")
    for key in ("device", "eval_batch_size", "log_every", "checkpoint_every"):
        d.pop(key)
    d["data"].pop("workers")
    d["data"].pop("batch_size")
    return d


__all__ = [
    "ClassifyConfig",
    "DataSection",
    "TextSection",
    "HeadSection",
    "ProbeSection",
    "DistillSection",
    "comparable",
]
