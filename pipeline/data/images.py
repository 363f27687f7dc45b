"""Image decoding shared by every stage: files, tar-shard members, alpha compositing."""

from __future__ import annotations

import io
import tarfile
from functools import lru_cache
from pathlib import Path

from PIL import Image

# Alpha images (emoji, clip art) are composited on white: a black default would make
# transparent art look like a different picture to the encoders.
BACKGROUND = (255, 255, 255)


class ImageDecodeError(Exception):
    """The image at a location is missing or cannot be decoded; callers record it as a reject."""


@lru_cache(maxsize=8)
def _tar_index(tar_path: str) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tar_path) as tf:
        return {m.name: m for m in tf.getmembers() if m.isfile()}


def read_bytes(location: str) -> bytes:
    """Raw bytes of ``path`` or ``shard.tar::member``."""
    try:
        if "::" in location:
            tar_path, member = location.split("::", 1)
            info = _tar_index(tar_path).get(member)
            if info is None:
                raise ImageDecodeError(f"{member} not in {tar_path}")
            with tarfile.open(tar_path) as tf:
                return tf.extractfile(info).read()
        return Path(location).read_bytes()
    except ImageDecodeError:
        raise
    except (OSError, tarfile.TarError) as exc:
        raise ImageDecodeError(f"cannot read {location}: {exc}") from exc


def decode_rgb(data: bytes, location: str = "<bytes>") -> Image.Image:
    """Decode to RGB, compositing transparency on a white background."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ImageDecodeError(f"cannot decode {location}: {exc}") from exc
    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def load_rgb(location: str) -> Image.Image:
    return decode_rgb(read_bytes(location), location)
