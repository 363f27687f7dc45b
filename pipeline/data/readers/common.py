"""Helpers shared by the dataset readers: split hashing, image paths, id bookkeeping, provenance."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tarfile
from pathlib import Path
from typing import Mapping

from pipeline.common.errors import PipelineError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_SPLIT = "train"


# ---- split assignment ---------------------------------------------------------------------
def parse_split_fractions(spec: str | Mapping[str, float] | None) -> dict[str, float] | None:
    """Validate ``{"train": 0.9, "val": 0.1}`` or the CLI form ``"train=0.9,val=0.1"``.

    Fractions must be non-negative and sum to 1, so no image silently falls outside every split.
    """
    if spec is None or spec == "" or spec == {}:
        return None
    if isinstance(spec, str):
        fractions: dict[str, float] = {}
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or not name:
                raise PipelineError(
                    f"split fractions {spec!r}: expected name=fraction pairs like train=0.9,val=0.1"
                )
            if name in fractions:
                raise PipelineError(f"split fractions {spec!r}: split {name!r} given twice")
            try:
                fractions[name] = float(value)
            except ValueError:
                raise PipelineError(f"split fractions {spec!r}: {value.strip()!r} is not a number") from None
    else:
        try:
            fractions = {str(k): float(v) for k, v in dict(spec).items()}
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"split fractions {spec!r}: {exc}") from None
    if any(not name for name in fractions):
        raise PipelineError(f"split fractions {spec!r}: empty split name")
    if any(not math.isfinite(f) or f < 0 for f in fractions.values()):
        raise PipelineError(f"split fractions {spec!r}: fractions must be finite and >= 0")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise PipelineError(f"split fractions {spec!r} sum to {total:g}, expected 1")
    return fractions


def assign_split(key: str, fractions: Mapping[str, float] | None) -> str:
    """Deterministic split for an image key: a hash of the key picks a point in [0, 1).

    Split names are walked in sorted order so the same fractions give the same assignment
    whatever order the user wrote them in. All captions of an image share its key, hence its split.
    """
    if not fractions:
        return DEFAULT_SPLIT
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2.0**64
    names = sorted(fractions)
    acc = 0.0
    for name in names:
        acc += fractions[name]
        if u < acc:
            return name
    # Floating-point rounding can leave a sliver just below 1.0: give it to the last non-empty split.
    return [n for n in names if fractions[n] > 0][-1]


# ---- paths ----------------------------------------------------------------------------------
def relative_to_root(path: str | Path, image_root: str | Path) -> str:
    """``path`` (absolute, or relative to the root) as a posix path relative to ``image_root`` when
    it lies under it, else absolute. os.path rather than pathlib: this runs once per image."""
    root = os.path.normpath(os.path.abspath(image_root)).rstrip(os.sep)
    full = os.path.normpath(os.path.join(root + os.sep, os.fspath(path)))  # join keeps an absolute path
    if full.startswith(root + os.sep):
        full = full[len(root) + 1 :]
    return full.replace(os.sep, "/")


def require_file(path: str | Path, what: str) -> Path:
    """Resolve an input file, or raise a one-line PipelineError."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PipelineError(f"{what} not found: {path}")
    if not path.is_file():
        raise PipelineError(f"{what} is not a file: {path}")
    return path.absolute()


def require_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise PipelineError(f"{what} is not a directory: {path}")
    return path.absolute()


def load_json_file(path: Path) -> object:
    """Parse a JSON input file; any failure is one user-facing line."""
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PipelineError(f"cannot read JSON {path}: {exc}") from None


def describe_source(fmt: str, path: Path, **options: object) -> str:
    """Provenance string stored in the manifest: format, input path and the options that shaped it."""
    opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(options.items())}
    return f"{fmt}:{path.as_posix()} {json.dumps(opts, sort_keys=True, default=str)}"


def number_unpaired(rows: list[dict], first_id: int) -> None:
    """Give declared image-only rows (``unpaired``) sample ids from ``first_id`` on, after every caption's, so
    declaring them never renumbers a pair."""
    for row in (r for r in rows if r.get("unpaired")):
        row["sample_id"] = first_id
        first_id += 1


def as_int_id(value: object) -> int | None:
    """An integer id from JSON/CSV values (``7``, ``"7"``, ``7.0``); None when it is not one."""
    if isinstance(value, bool):  # bool is an int subclass; True is not a meaningful id
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


class ImageIdRegistry:
    """Keeps image ids and image paths one-to-one; a conflict is returned as a reject reason."""

    def __init__(self) -> None:
        self._path_of: dict[int, str] = {}
        self._id_of: dict[str, int] = {}

    def claim(self, image_id: int, image_path: str) -> str | None:
        """Register ``image_id <-> image_path``; returns a reason string when it conflicts."""
        known_path = self._path_of.get(image_id)
        if known_path is not None and known_path != image_path:
            return f"duplicate image_id {image_id} (already used by {known_path})"
        known_id = self._id_of.get(image_path)
        if known_id is not None and known_id != image_id:
            return f"image {image_path} already has image_id {known_id}, not {image_id}"
        self._path_of[image_id] = image_path
        self._id_of[image_path] = image_id
        return None


class ImageLocator:
    """Resolves image locations against a root and checks they exist, without reading pixels.

    Plain files are stat-ed; ``shard.tar::member`` locations check the member against the tar's
    index, read once per tar (the same way ``pipeline.data.images`` will look the member up later).
    """

    def __init__(self, image_root: Path) -> None:
        self.image_root = image_root
        # Tables repeat an image once per caption: each path is resolved and stat-ed once.
        self._relative: dict[str, str] = {}
        self._exists: dict[str, bool] = {}
        self._tar_members: dict[str, frozenset[str]] = {}

    def relative(self, location: str) -> str:
        """Location relative to the root where possible (the ``::member`` suffix is kept)."""
        rel = self._relative.get(location)
        if rel is None:
            file_part, sep, member = location.partition("::")
            rel = self._relative[location] = relative_to_root(file_part, self.image_root) + sep + member
        return rel

    def missing_reason(self, relative_location: str) -> str:
        """The reject reason for a location that does not exist, naming the path that was tried."""
        file_part, sep, member = relative_location.partition("::")
        return f"image file not found (tried {os.path.join(self.image_root, file_part)}{sep}{member})"

    def exists(self, relative_location: str) -> bool:
        found = self._exists.get(relative_location)
        if found is None:
            found = self._exists[relative_location] = self._check(relative_location)
        return found

    def _check(self, relative_location: str) -> bool:
        file_part, sep, member = relative_location.partition("::")
        path = os.path.join(self.image_root, file_part)
        if not sep:
            return os.path.isfile(path)
        if path not in self._tar_members:
            try:
                with tarfile.open(path) as tf:
                    self._tar_members[path] = frozenset(m.name for m in tf.getmembers() if m.isfile())
            except (OSError, tarfile.TarError):
                self._tar_members[path] = frozenset()
        return member in self._tar_members[path]


MISSING_IMAGE = "image file not found"


def suggest_image_root(image_root: str | Path, relative_paths: list[str], sample: int = 20) -> Path | None:
    """A root under which the images of ``relative_paths`` exist, when ``image_root`` finds none of them.

    Tries the usual mistakes: a root one or two folders too deep (the paths already start with the root's
    last folders, a doubled prefix) and a root one folder too shallow (a prefix missing from the paths).
    Returns the candidate that finds the most of the first ``sample`` paths, or None.
    """
    root = Path(image_root).absolute()
    files = [p.partition("::")[0] for p in relative_paths[:sample]]
    candidates = [root.parent, root.parent.parent]
    try:  # one level down: bounded, so a huge folder of images is not listed in full
        candidates += sorted(d for d, _ in zip((e for e in root.iterdir() if e.is_dir()), range(200)))
    except OSError:
        pass
    best, best_hits = None, 0
    for cand in candidates:
        hits = sum(os.path.isfile(os.path.join(cand, f)) for f in files)
        if hits > best_hits:
            best, best_hits = cand, hits
    return best


def all_images_missing_error(image_root: str | Path, rejects: list, n_rows: int) -> str | None:
    """The one-line error for a manifest whose every image is missing (None when some image was found)."""
    missing = [r.image_path for r in rejects if r.reason.startswith(MISSING_IMAGE) and r.image_path]
    if not missing or n_rows:
        return None
    first = os.path.join(Path(image_root).absolute(), missing[0].partition("::")[0])
    msg = f"no image found under --image-root {Path(image_root).absolute()} (e.g. tried {first})"
    better = suggest_image_root(image_root, list(dict.fromkeys(missing)))
    if better is not None:
        msg += f"; the images are under {better}: use --image-root {better}"
    return msg
