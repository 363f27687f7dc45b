"""The multi-style emoji corpus through the real command, on tiny Iconify packages made here in npm's format."""

from __future__ import annotations

import io as stdio
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline.data.datasets.npm import LOCK_FORMAT, integrity_of, read_lock
from pipeline.data.manifest import Manifest, read_rejects

ROOT = Path(__file__).resolve().parents[1]
SQUARE = '<rect x="2" y="2" width="12" height="12" fill="#e33"/>'


def npm_tarball(cache: Path, package: str, version: str, licence: str, icons: dict, chars: dict | None = None):
    """``npm pack`` output for an Iconify JSON package: ``<scope>-<name>-<version>.tgz`` holding ``package/``."""
    files = {"package/icons.json": {"prefix": "t", "width": 16, "height": 16,
                                    "icons": {n: {"body": b} for n, b in icons.items()}},
             "package/package.json": {"name": package, "version": version, "license": licence},
             "package/info.json": {"license": {"title": licence, "spdx": licence}}}
    if chars is not None:
        files["package/chars.json"] = chars
    write_tarball(cache, package, version, files)


def lock_for(cache: Path) -> Path:
    """The npm lock pinning the packages made in ``cache`` (the commands get it with --npm-lock)."""
    return cache.parent / "npm-lock.json"


def write_tarball(cache: Path, package: str, version: str, files: dict) -> Path:
    """A gzipped tar of JSON files, as ``npm pack`` writes a package, pinned (version, sha512) in lock_for(cache)."""
    path = cache / f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, content in files.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, stdio.BytesIO(data))
    lock = lock_for(cache)
    pins = json.loads(lock.read_text()) if lock.is_file() else {"format": LOCK_FORMAT, "packages": {}}
    pins["packages"][package] = {"version": version, "integrity": integrity_of(path)}
    lock.write_text(json.dumps(pins))
    return path


def cli(*args, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_build_corpus_maps_icons_to_emoji_in_every_style(tmp_path):
    cache = tmp_path / "npm"
    npm_tarball(cache, "@iconify-json/twemoji", "1.0.0", "CC-BY-4.0",
                {"grinning-face": SQUARE, "heart-1": SQUARE, "not-an-emoji-at-all": SQUARE}, {"2764": "heart-1"})
    npm_tarball(cache, "@iconify-json/noto", "2.0.0", "Apache-2.0", {"grinning-face": SQUARE, "red-heart": SQUARE})
    out = tmp_path / "corpus"
    result = cli("build-corpus", "--styles", "twemoji,noto", "--npm-cache", cache, "--npm-lock", lock_for(cache),
                 "--out", out, "--size", 32)
    assert result.returncode == 0, result.stderr[-2000:]
    m = Manifest.read(out / "train.parquet")
    rows = m.table.to_pylist()
    paths = sorted({r["image_path"] for r in rows})
    assert paths == ["images/noto/1f600.png", "images/noto/2764.png", "images/twemoji/1f600.png",
                     "images/twemoji/2764.png"]
    assert all(Path(m.resolve(p)).is_file() for p in paths) and {r["split"] for r in rows} == {"train"}
    assert {r["caption"] for r in rows if r["image_path"].endswith("1f600.png")} >= {"grinning face"}
    assert len({r["image_id"] for r in rows}) == 4  # one image per style and emoji
    rejects = read_rejects(out / "rejects.parquet")
    assert [(r.source_row, r.reason) for r in rejects] == [
        ("@iconify-json/twemoji:not-an-emoji-at-all", "no emoji for this icon name")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["styles"]["twemoji"] == {"icons": 3, "emoji": 2, "excluded": 0, "images": 2,
                                            "captions": summary["styles"]["twemoji"]["captions"]}
    assert "`@iconify-json/noto` 2.0.0: Apache-2.0" in (out / "ATTRIBUTION.md").read_text()

    # the zero-shot-concept variant: concepts of a manifest (openmoji names files by code points) left out
    test_split = Manifest.from_rows([{"sample_id": 1, "image_id": 1, "image_path": "1f600.png",
                                      "caption": "grinning face", "split": "test", "label": None}], source="test")
    test_split.write(tmp_path / "test.parquet")
    out2 = tmp_path / "corpus-zs"
    result = cli("build-corpus", "--styles", "twemoji,noto", "--npm-cache", cache, "--npm-lock", lock_for(cache),
                 "--out", out2, "--size", 32,
                 "--exclude-concepts", tmp_path / "test.parquet")
    assert result.returncode == 0, result.stderr[-2000:]
    kept = {r["image_path"] for r in Manifest.read(out2 / "train.parquet").table.to_pylist()}
    assert kept == {"images/noto/2764.png", "images/twemoji/2764.png"}
    assert json.loads((out2 / "summary.json").read_text())["styles"]["noto"]["excluded"] == 1


def test_build_corpus_refuses_bad_licences_and_missing_packages_in_one_line(tmp_path):
    cache = tmp_path / "npm"
    npm_tarball(cache, "@iconify-json/noto", "2.0.0", "GPL-3.0", {"grinning-face": SQUARE})
    result = cli("build-corpus", "--styles", "noto", "--npm-cache", cache, "--npm-lock", lock_for(cache),
                 "--out", tmp_path / "c")
    assert result.returncode == 2 and "licensed GPL-3.0" in result.stderr and "Traceback" not in result.stderr
    result = cli("build-corpus", "--styles", "twemoji", "--npm-cache", cache, "--npm-lock", lock_for(cache),
                 "--out", tmp_path / "c")
    assert result.returncode == 2 and "npm package @iconify-json/twemoji is not pinned in" in result.stderr
    no_npm = {"PATH": str(Path(sys.executable).parent)}  # python, but no npm; the project's lock pins twemoji
    result = cli("build-corpus", "--styles", "twemoji", "--npm-cache", cache, "--out", tmp_path / "c",
                 env_extra=no_npm)
    version = read_lock()["@iconify-json/twemoji"].version
    assert result.returncode == 2 and f"npm is needed to fetch @iconify-json/twemoji@{version}" in result.stderr
    result = cli("build-corpus", "--styles", "nosuch", "--npm-cache", cache, "--npm-lock", lock_for(cache),
                 "--out", tmp_path / "c")
    assert result.returncode == 2 and "unknown styles ['nosuch']" in result.stderr


def annotations_tarball(cache: Path, package: str, folder: str, annotations: dict) -> None:
    """``npm pack`` output of a CLDR annotations package (cldr-json layout, English only)."""
    files = {f"package/{folder}/en/annotations.json": {folder: {"identity": {"language": "en"},
                                                               "annotations": annotations}},
             "package/package.json": {"name": package, "version": "48.2.0", "license": "Unicode-3.0"}}
    write_tarball(cache, package, "48.2.0", files)


def test_keyword_captions_come_from_cldr_annotations(tmp_path):
    cache = tmp_path / "npm"
    npm_tarball(cache, "@iconify-json/noto", "2.0.0", "Apache-2.0",
                {"grinning-face": SQUARE, "red-heart": SQUARE, "waving-hand-light-skin-tone": SQUARE})
    annotations_tarball(cache, "cldr-annotations-full", "annotations",
                        {"😀": {"default": ["face", "grin"], "tts": ["grinning face"]}, "❤": {"default": []}})
    annotations_tarball(cache, "cldr-annotations-derived-full", "annotationsDerived",
                        {"👋🏻": {"default": ["hello", "wave"], "tts": ["waving hand: light skin tone"]}})
    out = tmp_path / "corpus"
    result = cli("build-corpus", "--styles", "noto", "--npm-cache", cache, "--npm-lock", lock_for(cache),
                 "--out", out, "--size", 16,
                 "--captions", "name,keywords")
    assert result.returncode == 0, result.stderr[-2000:]
    captions: dict = {}
    for r in Manifest.read(out / "train.parquet").table.to_pylist():
        captions.setdefault(Path(r["image_path"]).stem, []).append(r["caption"])
    assert captions["1f600"][0] == "grinning face" and captions["1f600"][-1] == "face, grin"
    assert captions["1f44b-1f3fb"][-1] == "hello, wave"  # skin-tone variants from the derived package
    assert not any("," in c for c in captions["2764"])  # no keywords, no keyword caption
    summary = json.loads((out / "summary.json").read_text())
    assert summary["captions"] == ["name", "keywords"] and summary["styles"]["noto"]["keyword_captions"] == 2
    assert "`cldr-annotations-full` 48.2.0: Unicode-3.0" in (out / "ATTRIBUTION.md").read_text()
    bad = cli("build-corpus", "--styles", "noto", "--npm-cache", cache, "--npm-lock", lock_for(cache),
              "--out", out, "--captions", "keywords,emoji")
    assert bad.returncode == 2 and "caption kinds ['emoji']" in bad.stderr


def test_an_icon_resvg_cannot_render_is_a_reject_and_its_neighbours_stay(tmp_path):
    """A broken icon body fails in the render pool: one recorded reject with resvg's reason, the other icons of
    the style rendered and paired in order."""
    cache = tmp_path / "npm"
    npm_tarball(cache, "@iconify-json/twemoji", "1.0.0", "CC-BY-4.0",
                {"grinning-face": SQUARE, "red-heart": '<rect width="oops" <<', "thumbs-up": SQUARE})
    out = tmp_path / "corpus"
    result = cli("build-corpus", "--styles", "twemoji", "--npm-cache", cache, "--npm-lock", lock_for(cache),
                 "--out", out, "--size", 32)
    assert result.returncode == 0, result.stderr[-2000:]
    paths = sorted({r["image_path"] for r in Manifest.read(out / "train.parquet").table.to_pylist()})
    assert paths == ["images/twemoji/1f44d.png", "images/twemoji/1f600.png"]
    rejects = read_rejects(out / "rejects.parquet")
    assert [(r.source_row, r.reason.split(":")[0]) for r in rejects] == [
        ("@iconify-json/twemoji:red-heart", "render failed")]
    assert json.loads((out / "summary.json").read_text())["styles"]["twemoji"]["images"] == 2


def test_npm_packages_are_fetched_at_their_pinned_version_and_a_tarball_off_its_hash_is_not_used(tmp_path,
                                                                                                  monkeypatch):
    from pipeline.common.errors import PipelineError
    from pipeline.data.datasets.npm import fetch_package

    made = tmp_path / "made"  # the registry's tarball, as a fake npm hands it out
    npm_tarball(made, "@iconify-json/noto", "2.0.0", "Apache-2.0", {"grinning-face": SQUARE})
    lock = lock_for(made)
    good = (made / "iconify-json-noto-2.0.0.tgz").read_bytes()
    bin_dir, calls = tmp_path / "bin", tmp_path / "npm-calls"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text(  # records its arguments, then "packs" the registry's tarball where asked
        f'#!/bin/sh\necho "$@" >> {calls}\ncp {made}/iconify-json-noto-2.0.0.tgz "$4/"\n')
    (bin_dir / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cache = tmp_path / "npm"
    root = fetch_package("@iconify-json/noto", cache, lock=lock)
    assert calls.read_text().split()[:2] == ["pack", "@iconify-json/noto@2.0.0"]  # the pinned version, not latest
    assert json.loads((root / "package.json").read_text())["version"] == "2.0.0"
    # a damaged cached tarball (and an unpacked folder that no longer matches the lock) is fetched again
    (cache / "iconify-json-noto-2.0.0.tgz").write_bytes(good[:-10] + b"x" * 10)
    (cache / "iconify-json-noto" / ".integrity").write_text("sha512-other\n")
    fetch_package("@iconify-json/noto", cache, lock=lock)
    assert len(calls.read_text().splitlines()) == 2
    assert (cache / "iconify-json-noto-2.0.0.tgz").read_bytes() == good
    fetch_package("@iconify-json/noto", cache, lock=lock)  # matching cache: no fetch
    assert len(calls.read_text().splitlines()) == 2
    # a registry tarball off the pinned hash is refused, not unpacked
    pins = json.loads(lock.read_text())
    pins["packages"]["@iconify-json/noto"]["integrity"] = "sha512-" + "A" * 86 + "=="
    lock.write_text(json.dumps(pins))
    with pytest.raises(PipelineError, match=r"gave a tarball whose sha512 is not the pinned one"):
        fetch_package("@iconify-json/noto", cache, lock=lock)
    # without npm, a cached tarball off its hash is an error that says what to do
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    with pytest.raises(PipelineError, match=r"does not match the sha512 pinned .* delete it, or install npm"):
        fetch_package("@iconify-json/noto", cache, lock=lock)


def test_the_project_npm_lock_pins_every_package_the_datasets_render_with_a_sha512():
    from pipeline.data.datasets.corpus import ANNOTATIONS, STYLES
    from pipeline.data.datasets.icons import ICON_SETS

    pins = read_lock()
    assert set(pins) == {*STYLES.values(), *ANNOTATIONS, *ICON_SETS.values()}
    assert all(p.version[0].isdigit() and len(p.integrity) == len("sha512-") + 88 for p in pins.values())
    check = subprocess.run([sys.executable, "tools/npm_lock.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0 and "12 npm packages pinned" in check.stdout, check.stderr
