"""Named line icons through the real command: captions from names, concepts kept in one split across sets."""

from __future__ import annotations

import json

from pipeline.data.datasets.icons import caption_of, concept_of
from pipeline.data.manifest import Manifest
from tests.test_corpus import SQUARE, cli, lock_for, npm_tarball

NAMES = [f"{base}{suffix}" for base in ("home", "account-circle", "bell", "camera", "car", "cloud", "heart",
                                         "lock-open", "map", "star", "sun", "tree", "user", "wifi", "zoom")
         for suffix in ("", "-outline", "-off")]


def test_captions_and_concepts():
    assert caption_of("account-circle-outline") == "account circle outline"
    assert concept_of("account-circle-outline") == concept_of("account-circle") == "account circle"
    assert concept_of("bell-off-2") == "bell" and concept_of("off") == "off"  # never empty
    # a modifier word that names the thing itself stays: "lock-open" is a lock, not "open"
    assert concept_of("lock-open") == concept_of("lock-open-outline") == "lock open"
    assert concept_of("plus-box") == "plus" and concept_of("lock") == "lock"


def test_build_icons_keeps_every_concept_in_one_split(tmp_path):
    cache = tmp_path / "npm"
    npm_tarball(cache, "@iconify-json/mdi", "1.0.0", "Apache-2.0", {n: SQUARE for n in NAMES})
    npm_tarball(cache, "@iconify-json/lucide", "1.0.0", "ISC", {n: SQUARE for n in NAMES[:24]})
    out = tmp_path / "icons"
    result = cli("build-icons", "--sets", "mdi,lucide", "--npm-cache", cache, "--npm-lock", lock_for(cache),
                 "--out", out, "--size", 24)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [r for split in ("train", "val", "test") if (out / f"{split}.parquet").is_file()
            for r in Manifest.read(out / f"{split}.parquet").table.to_pylist()]
    assert len(rows) == len(NAMES) + 24 and {r["split"] for r in rows} >= {"train", "test"}
    split_of: dict[str, set] = {}
    for r in rows:
        split_of.setdefault(r["label"], set()).add(r["split"])
        assert r["caption"] == caption_of(r["image_path"].split("/")[-1][:-4])
    assert all(len(s) == 1 for s in split_of.values())  # no concept in two splits (any set, any variant)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["concepts"] == 15 and set(summary["splits"]["train"]) == {"mdi", "lucide"}
    assert "`@iconify-json/lucide` 1.0.0: ISC" in (out / "ATTRIBUTION.md").read_text()
    bad = cli("build-icons", "--sets", "nosuch", "--npm-cache", cache, "--npm-lock", lock_for(cache), "--out", out)
    assert bad.returncode == 2 and "unknown icon sets ['nosuch']" in bad.stderr
