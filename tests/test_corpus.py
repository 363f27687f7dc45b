"""The multi-style emoji corpus through the real command, on tiny Iconify packages made here in npm's format."""

from __future__ import annotations

import io as stdio
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

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
    write_tarball(cache / f"{package.lstrip('@').replace('/', '-')}-{version}.tgz", files)


def write_tarball(path: Path, files: dict) -> None:
    """A gzipped tar of JSON files, as ``npm pack`` writes a package."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, content in files.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, stdio.BytesIO(data))


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
    result = cli("build-corpus", "--styles", "twemoji,noto", "--npm-cache", cache, "--out", out, "--size", 32)
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
    result = cli("build-corpus", "--styles", "twemoji,noto", "--npm-cache", cache, "--out", out2, "--size", 32,
                 "--exclude-concepts", tmp_path / "test.parquet")
    assert result.returncode == 0, result.stderr[-2000:]
    kept = {r["image_path"] for r in Manifest.read(out2 / "train.parquet").table.to_pylist()}
    assert kept == {"images/noto/2764.png", "images/twemoji/2764.png"}
    assert json.loads((out2 / "summary.json").read_text())["styles"]["noto"]["excluded"] == 1


def test_build_corpus_refuses_bad_licences_and_missing_packages_in_one_line(tmp_path):
    cache = tmp_path / "npm"
    npm_tarball(cache, "@iconify-json/noto", "2.0.0", "GPL-3.0", {"grinning-face": SQUARE})
    result = cli("build-corpus", "--styles", "noto", "--npm-cache", cache, "--out", tmp_path / "c")
    assert result.returncode == 2 and "licensed GPL-3.0" in result.stderr and "Traceback" not in result.stderr
    no_npm = {"PATH": str(Path(sys.executable).parent)}  # python, but no npm
    result = cli("build-corpus", "--styles", "twemoji", "--npm-cache", cache, "--out", tmp_path / "c",
                 env_extra=no_npm)
    assert result.returncode == 2 and "npm is needed to fetch @iconify-json/twemoji" in result.stderr
    result = cli("build-corpus", "--styles", "nosuch", "--npm-cache", cache, "--out", tmp_path / "c")
    assert result.returncode == 2 and "unknown styles ['nosuch']" in result.stderr


def annotations_tarball(cache: Path, package: str, folder: str, annotations: dict) -> None:
    """``npm pack`` output of a CLDR annotations package (cldr-json layout, English only)."""
    files = {f"package/{folder}/en/annotations.json": {folder: {"identity": {"language": "en"},
                                                               "annotations": annotations}},
             "package/package.json": {"name": package, "version": "48.2.0", "license": "Unicode-3.0"}}
    write_tarball(cache / f"{package}-48.2.0.tgz", files)


def test_keyword_captions_come_from_cldr_annotations(tmp_path):
    cache = tmp_path / "npm"
    npm_tarball(cache, "@iconify-json/noto", "2.0.0", "Apache-2.0",
                {"grinning-face": SQUARE, "red-heart": SQUARE, "waving-hand-light-skin-tone": SQUARE})
    annotations_tarball(cache, "cldr-annotations-full", "annotations",
                        {"😀": {"default": ["face", "grin"], "tts": ["grinning face"]}, "❤": {"default": []}})
    annotations_tarball(cache, "cldr-annotations-derived-full", "annotationsDerived",
                        {"👋🏻": {"default": ["hello", "wave"], "tts": ["waving hand: light skin tone"]}})
    out = tmp_path / "corpus"
    result = cli("build-corpus", "--styles", "noto", "--npm-cache", cache, "--out", out, "--size", 16,
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
    bad = cli("build-corpus", "--styles", "noto", "--npm-cache", cache, "--out", out, "--captions", "keywords,emoji")
    assert bad.returncode == 2 and "caption kinds ['emoji']" in bad.stderr


def test_an_icon_resvg_cannot_render_is_a_reject_and_its_neighbours_stay(tmp_path):
    """A broken icon body fails in the render pool: one recorded reject with resvg's reason, the other icons of
    the style rendered and paired in order."""
    cache = tmp_path / "npm"
    npm_tarball(cache, "@iconify-json/twemoji", "1.0.0", "CC-BY-4.0",
                {"grinning-face": SQUARE, "red-heart": '<rect width="oops" <<', "thumbs-up": SQUARE})
    out = tmp_path / "corpus"
    result = cli("build-corpus", "--styles", "twemoji", "--npm-cache", cache, "--out", out, "--size", 32)
    assert result.returncode == 0, result.stderr[-2000:]
    paths = sorted({r["image_path"] for r in Manifest.read(out / "train.parquet").table.to_pylist()})
    assert paths == ["images/twemoji/1f44d.png", "images/twemoji/1f600.png"]
    rejects = read_rejects(out / "rejects.parquet")
    assert [(r.source_row, r.reason.split(":")[0]) for r in rejects] == [
        ("@iconify-json/twemoji:red-heart", "render failed")]
    assert json.loads((out / "summary.json").read_text())["styles"]["twemoji"]["images"] == 2
