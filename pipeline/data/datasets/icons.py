"""Named line icons from npm Iconify packages: a domain the emoji models have not seen (issue 14's adaptation
target), captioned by their names ("account-circle-outline" -> "account circle outline").

Variants of one concept (``-outline``, ``-off``, ``-filled``, a trailing number, ...) share a concept key, and
whole concepts go to one split, in every set at once, so a test icon's concept is never trained on in another
set or variant. Layout of ``--out``: ``images/<set>/<name>.png``, ``svg/...``, ``train/val/test.parquet``,
``rejects.parquet``, ``summary.json`` (per split and set: images and pairs), ``ATTRIBUTION.md``.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.common import io
from pipeline.common.errors import PipelineError
from pipeline.common.paths import REJECTS, manifest_path
from pipeline.data.datasets.corpus import read_icon_set, render_icon, split_counts
from pipeline.data.datasets.npm import fetch_package
from pipeline.data.datasets.openmoji import RenderError, assign_splits, int63
from pipeline.data.manifest import Manifest, Reject, write_rejects

ICON_SETS = {"mdi": "@iconify-json/mdi", "tabler": "@iconify-json/tabler", "lucide": "@iconify-json/lucide"}
# Name tokens that make a variant of the same concept, not a new one.
VARIANT_TOKENS = {"outline", "outlined", "filled", "fill", "off", "variant", "sharp", "rounded", "box", "alt",
                  "thin", "bold", "solid", "line", "plus", "minus", "check", "remove", "edit", "lock"}
TEST_FRACTION, VAL_FRACTION = 0.15, 0.05


def caption_of(name: str) -> str:
    return " ".join(t for t in re.split(r"[-_]+", name) if t)


def concept_of(name: str) -> str:
    """The concept key of an icon name: its words without variant tokens and numbers after the first word
    (the first word names the thing: "lock-open" is a lock, "bell-off" a bell, "plus-box" a plus sign)."""
    words = [t for t in re.split(r"[-_]+", name.lower()) if t]
    core = words[:1] + [w for w in words[1:] if w not in VARIANT_TOKENS and not w.isdigit()]
    return " ".join(core)


def build_icons(out_dir: Path, sets: list[str], cache_dir: Path, size: int = 224, limit: int | None = None,
                npm_lock: Path | None = None) -> dict:
    """Render every icon of the named sets and write split manifests (module docstring); returns the summary."""
    unknown = [s for s in sets if s not in ICON_SETS]
    if unknown:
        raise PipelineError(f"unknown icon sets {unknown}; choose from {sorted(ICON_SETS)}")
    rows: list[dict] = []
    rejects: list[Reject] = []
    loaded = []
    for name in sets:
        icon_set = read_icon_set(name, ICON_SETS[name], fetch_package(ICON_SETS[name], cache_dir, lock=npm_lock))
        loaded.append(icon_set)
        for icon in sorted(icon_set.icons)[:limit]:
            caption = caption_of(icon)
            try:
                rel = render_icon(icon_set, icon, out_dir, icon, size)
            except RenderError as exc:
                rejects.append(Reject(f"{icon_set.package}:{icon}", f"render failed: {exc}",
                                      f"images/{name}/{icon}.png", caption))
                continue
            key = f"{name}/{icon}"
            rows.append({"sample_id": int63(f"icons:{key}\n{caption}"), "image_id": int63(f"icons:{key}"),
                         "image_path": rel, "caption": caption, "label": concept_of(icon),
                         "source_row": f"{icon_set.package}:{icon}"})
    groups: dict[str, int] = {}
    for r in rows:
        groups[r["label"]] = groups.get(r["label"], 0) + 1
    split_of = assign_splits(groups, round(TEST_FRACTION * len(rows)), round(VAL_FRACTION * len(rows)))
    by_split: dict[str, list[dict]] = {}
    for r in rows:
        r["split"] = split_of[r["label"]]
        by_split.setdefault(r["split"], []).append(r)
    source = "named icons " + " ".join(f"{s.package}@{s.version}" for s in loaded) + f" size={size}"
    for split, split_rows in by_split.items():
        manifest = Manifest.from_rows(split_rows, source=source, image_root=".", rejects=rejects)
        manifest.write(manifest_path(out_dir, split))
    write_rejects(rejects, out_dir / REJECTS)
    summary = {"size": size, "sets": sets, "icons": len(rows) + len(rejects), "images": len(rows),
               "concepts": len(groups), "rejects": len(rejects), "splits": split_counts(by_split)}
    io.write_json(out_dir / "summary.json", summary)
    lines = ["# Attribution", "", "Line icons from these npm packages (Iconify JSON), rendered with resvg; captions "
             "are the icon names.", ""]
    lines += [f"- `{s.package}` {s.version}: {s.licence} ({s.licence_url or 'see the package'})" for s in loaded]
    io.write_text(out_dir / "ATTRIBUTION.md", "\n".join(lines) + "\n")
    return summary


__all__ = ["ICON_SETS", "build_icons", "caption_of", "concept_of"]
