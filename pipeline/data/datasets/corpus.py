"""A multi-style emoji corpus from npm icon packages: the "pretraining data" of a teacher that has seen the
concepts of the openmoji benchmark in other art styles (issue 12).

Each style is an Iconify JSON package (``icons.json``: SVG bodies by icon name; ``chars.json``, where present:
code points -> icon name). An icon becomes an emoji through ``chars.json`` or, failing that, through its name
(Iconify names are CLDR names in kebab case). Captions are the CLDR name and aliases, as for openmoji, and with
``captions=("name", "keywords")`` also one caption of another kind: the CLDR keyword annotations of the emoji
(npm ``cldr-annotations-full`` and ``-derived-full`` for skin-tone and ZWJ sequences), e.g. "cheerful, face,
grin, happy, smile". Icons with no emoji are rejects with the reason; packages whose licence is not on the
allow-list are refused.

Left out on purpose: the PNG packages ``emoji-datasource-*``. Their Google and Twitter images are the Noto and
Twemoji art the SVG packages above already render (at any size), Facebook's images have no clear licence and
Apple's are not licensed for this use (the package README says so).

Layout of ``--out``: ``images/<style>/<code points>.png``, ``svg/<style>/...``, ``train.parquet`` (every row is
training data for a teacher: no openmoji image is in it), ``rejects.parquet``, ``summary.json`` (per style:
icons, emoji, images, captions), ``ATTRIBUTION.md``.

With a benchmark (``--benchmark data/openmoji``) the folder becomes the teacher's world, a dataset of its own:
``train`` = the corpus minus a validation slice + the benchmark's train split; ``val`` = that slice (every
``VAL_EVERY``-th corpus image by a hash of its key: other styles of concepts the train split also shows);
``test`` = the benchmark's test split, row for row. The benchmark's val and test images are never training
data, and its val split is not used at all (model selection happens on the corpus slice).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
import hashlib
import os
from pathlib import Path

from pipeline.common import io
from pipeline.common.errors import PipelineError
from pipeline.common.paths import REJECTS, manifest_path
from pipeline.data.datasets.openmoji import (
    RenderError, base_key, captions_for, image_id_for, lookup_entry, render_many, render_svg, sample_id_for,
)
from pipeline.data.datasets.npm import fetch_package
from pipeline.data.manifest import Manifest, Reject

# style -> npm package (licences as published; checked again from each package's info.json)
STYLES = {
    "noto": "@iconify-json/noto",
    "twemoji": "@iconify-json/twemoji",
    "fluent-flat": "@iconify-json/fluent-emoji-flat",
    "fluent-3d": "@iconify-json/fluent-emoji",
    "fluent-hc": "@iconify-json/fluent-emoji-high-contrast",
    "emojione": "@iconify-json/emojione",
    "fxemoji": "@iconify-json/fxemoji",
}
ALLOWED_LICENCES = ("Apache-2.0", "MIT", "CC-BY-4.0", "ISC", "CC-BY-SA-4.0")
ANNOTATIONS = ("cldr-annotations-full", "cldr-annotations-derived-full")  # keyword captions (Unicode-3.0 data)
CAPTION_KINDS = ("name", "keywords")
VAL_EVERY = 25  # one corpus image in 25 (4%) is the world's validation split
BENCHMARK_STYLE = "openmoji"  # the style name benchmark rows are counted under


@dataclass
class IconSet:
    style: str
    package: str
    version: str
    licence: str
    licence_url: str
    width: int
    height: int
    icons: dict[str, dict]  # name -> {"body", optional "width"/"height"}
    by_name: dict[str, str] = field(default_factory=dict)  # icon name -> code point stem ("1f600")


def read_icon_set(style: str, package: str, root: Path) -> IconSet:
    try:
        icons = json.loads((root / "icons.json").read_text())
        pkg = json.loads((root / "package.json").read_text())
        info = json.loads((root / "info.json").read_text()) if (root / "info.json").is_file() else {}
        chars = json.loads((root / "chars.json").read_text()) if (root / "chars.json").is_file() else {}
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{package} in {root} is not an Iconify JSON package: {exc}") from None
    licence = (info.get("license") or {}).get("spdx") or pkg.get("license") or "unknown"
    if licence not in ALLOWED_LICENCES:
        raise PipelineError(f"{package} is licensed {licence}, not one of {ALLOWED_LICENCES}; leave it out")
    return IconSet(style, package, str(pkg.get("version", "")), licence, (info.get("license") or {}).get("url", ""),
                   int(icons.get("width", 16)), int(icons.get("height", 16)), icons["icons"],
                   {name: stem for stem, name in chars.items()})


def _names_to_stems(emoji_data: dict) -> dict[str, str]:
    """CLDR short code in kebab case -> code point stem, e.g. "grinning-face" -> "1f600"."""
    out = {}
    for seq, entry in emoji_data.items():
        name = entry.get("en")
        if name:
            kebab = name.strip(":").lower().replace("_", "-")
            out.setdefault(kebab, "-".join(f"{ord(c):x}" for c in seq if ord(c) != 0xFE0F))
    return out


def _svg(icon: dict, width: int, height: int) -> str:
    w, h = icon.get("width", width), icon.get("height", height)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="{icon.get("left", 0)} {icon.get("top", 0)} {w} {h}" '
            f'width="{w}" height="{h}">{icon["body"]}</svg>')


def read_keywords(cache_dir: Path, npm_lock: Path | None = None) -> tuple[dict[str, str], list[str]]:
    """Emoji sequence (without VS16) -> its English CLDR keywords as one caption; and the attribution lines."""
    keywords: dict[str, str] = {}
    credits = []
    for package, folder in zip(ANNOTATIONS, ("annotations", "annotationsDerived")):
        root = fetch_package(package, cache_dir, marker=f"{folder}/en/annotations.json", lock=npm_lock)
        try:
            data = json.loads((root / folder / "en" / "annotations.json").read_text())
            pkg = json.loads((root / "package.json").read_text())
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{package} in {root} is not a CLDR annotations package: {exc}") from None
        for seq, entry in data[folder]["annotations"].items():
            words = [w for w in entry.get("default", []) if w.strip()]
            if words:
                keywords.setdefault(seq.replace("\ufe0f", ""), ", ".join(words))
        credits.append(f"- `{package}` {pkg.get('version', '')}: {pkg.get('license', 'unknown')} (keyword captions)")
    return keywords, credits


def write_icon_svg(icon_set: IconSet, name: str, out_dir: Path, file_stem: str) -> tuple[Path, str]:
    """Write icon ``name``'s SVG under ``out_dir``; returns it and its PNG's path relative to ``out_dir``
    (``images/<style>/<file_stem>.png``), which ``render_svg``/``render_many`` write."""
    svg = out_dir / "svg" / icon_set.style / f"{file_stem}.svg"
    io.write_text(svg, _svg(icon_set.icons[name], icon_set.width, icon_set.height))
    return svg, f"images/{icon_set.style}/{file_stem}.png"


def render_icon(icon_set: IconSet, name: str, out_dir: Path, file_stem: str, size: int) -> str:
    """``write_icon_svg`` and its ``size`` px PNG; returns the PNG's relative path. RenderError when resvg cannot
    rasterise it."""
    svg, rel = write_icon_svg(icon_set, name, out_dir, file_stem)
    render_svg(svg, out_dir / rel, size)
    return rel


@dataclass
class CorpusBuild:
    paths: dict[str, Path]
    summary: dict


def build_corpus(out_dir: Path, styles: list[str], cache_dir: Path, size: int = 224, limit: int | None = None,
                 exclude: Manifest | None = None, benchmark: Path | None = None,
                 captions: tuple[str, ...] = ("name",), npm_lock: Path | None = None) -> CorpusBuild:
    """Render every style's emoji icons and write the corpus manifest (module docstring)."""
    import emoji

    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        raise PipelineError(f"unknown styles {unknown}; choose from {sorted(STYLES)}")
    bad = [c for c in captions if c not in CAPTION_KINDS] or ([] if "name" in captions else ["(name is required)"])
    if bad:
        raise PipelineError(f"caption kinds {bad}: choose from {list(CAPTION_KINDS)}, name included")
    keywords, keyword_credits = read_keywords(cache_dir, npm_lock) if "keywords" in captions else ({}, [])
    by_kebab = _names_to_stems(emoji.EMOJI_DATA)
    excluded = {base_key(Path(p).stem) for p in exclude.table.column("image_path").to_pylist()} if exclude else set()
    rows: list[dict] = []
    rejects: list[Reject] = []
    todo: list[tuple] = []  # (style, stem, emoji entry, where, svg, png path): rendered together, in order
    summary: dict = {"size": size, "captions": list(captions), "excluded_concepts": len(excluded), "styles": {}}
    sets = []
    for style in styles:
        icon_set = read_icon_set(style, STYLES[style], fetch_package(STYLES[style], cache_dir, lock=npm_lock))
        sets.append(icon_set)
        counts = {"icons": len(icon_set.icons), "emoji": 0, "excluded": 0, "images": 0, "captions": 0}
        for name in sorted(icon_set.icons)[:limit]:
            where = f"{icon_set.package}:{name}"
            stem = icon_set.by_name.get(name) or by_kebab.get(name)
            entry = lookup_entry(stem, emoji.EMOJI_DATA) if stem else None
            if entry is None:
                rejects.append(Reject(where, "no emoji for this icon name"))
                continue
            counts["emoji"] += 1
            if base_key(stem) in excluded:
                counts["excluded"] += 1
                continue
            todo.append((style, stem, entry, where, *write_icon_svg(icon_set, name, out_dir, stem)))
        summary["styles"][style] = counts
    for (style, stem, entry, where, svg, rel), outcome in zip(
            todo, render_many([(svg, out_dir / rel, size) for *_, svg, rel in todo])):
        counts = summary["styles"][style]
        if isinstance(outcome, str):
            rejects.append(Reject(where, f"render failed: {outcome}", rel))
            continue
        key = f"{style}/{stem}"
        cps = [int(c, 16) for c in stem.split("-")]
        texts = captions_for(entry, cps)
        tags = keywords.get("".join(map(chr, cps)).replace("\ufe0f", ""))
        if tags and tags not in texts:
            texts.append(tags)
        if keywords:
            counts["keyword_captions"] = counts.get("keyword_captions", 0) + bool(tags)
        for caption in texts:
            rows.append({"sample_id": sample_id_for(key, caption), "image_id": image_id_for(key),
                         "image_path": rel, "caption": caption, "split": "train", "label": None,
                         "source_row": where})
        counts["images"] += 1
        counts["captions"] += len(texts)
    source = "emoji corpus " + " ".join(f"{s.package}@{s.version}" for s in sets) + f" size={size}"
    summary.update(images=sum(c["images"] for c in summary["styles"].values()), pairs=len(rows),
                   rejects=len(rejects))
    by_split = {"train": rows}
    if benchmark is not None:
        by_split = world_splits(rows, benchmark, out_dir)
        source += f" + benchmark {benchmark}"
    paths = {}
    for split, split_rows in by_split.items():  # image paths relative to the output folder
        manifest = Manifest.from_rows(split_rows, source=source, image_root=".", rejects=rejects)
        paths[split] = manifest.write(manifest_path(out_dir, split))
    paths["rejects"] = manifest.write_rejects(out_dir / REJECTS)
    summary["splits"] = split_counts(by_split)
    paths["summary"] = io.write_json(out_dir / "summary.json", summary)
    lines = ["# Attribution", "", "Emoji art from these npm packages (Iconify JSON), rendered with resvg; captions "
             "are Unicode CLDR names (PyPI `emoji`).", ""]
    lines += [f"- `{s.package}` {s.version}: {s.licence} ({s.licence_url or 'see the package'})" for s in sets]
    lines += keyword_credits
    paths["attribution"] = io.write_text(out_dir / "ATTRIBUTION.md", "\n".join(lines) + "\n")
    return CorpusBuild(paths, summary)


def world_splits(corpus_rows: list[dict], benchmark: Path, out_dir: Path) -> dict[str, list[dict]]:
    """The teacher-world splits (module docstring): corpus + benchmark train, a corpus val slice, benchmark test."""
    from pipeline.common.paths import manifest_path as split_path

    def is_val(row: dict) -> bool:
        digest = hashlib.blake2b(row["image_path"].encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % VAL_EVERY == 0

    out = {"train": [dict(r) for r in corpus_rows if not is_val(r)],
           "val": [{**r, "split": "val"} for r in corpus_rows if is_val(r)], "test": []}
    for split in ("train", "test"):
        path = split_path(benchmark, split)
        if not path.is_file():
            raise PipelineError(f"benchmark {benchmark} has no {split} split ({path}); build it first "
                                "(make dataset)")
        m = Manifest.read(path)
        for row in m.table.to_pylist():  # same ids and captions; the path is re-rooted at the output folder
            row["image_path"] = os.path.relpath(m.resolve(row["image_path"]), out_dir.resolve())
            out[split].append(row)
    return {k: v for k, v in out.items() if v}


def row_style(row: dict) -> str:
    parts = Path(row["image_path"]).parts
    return parts[1] if len(parts) > 2 and parts[0] == "images" else BENCHMARK_STYLE


def split_counts(by_split: dict[str, list[dict]]) -> dict:
    """Per split and style: images and pairs (what every model trained on the folder saw)."""
    counts: dict = {}
    for split, rows in by_split.items():
        styles: dict = {}
        for row in rows:
            c = styles.setdefault(row_style(row), {"images": set(), "pairs": 0})
            c["images"].add(row["image_id"])
            c["pairs"] += 1
        counts[split] = {st: {"images": len(c["images"]), "pairs": c["pairs"]} for st, c in sorted(styles.items())}
    return counts


__all__ = ["STYLES", "ALLOWED_LICENCES", "build_corpus", "world_splits", "split_counts", "render_icon", "write_icon_svg", "read_icon_set", "CorpusBuild"]
