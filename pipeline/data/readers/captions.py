"""A caption list: a text file of captions, one per line, without images (caption-only rows, transfer data)."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.manifest import Manifest, Reject
from pipeline.data.readers.common import require_file


def read_captions(path: str | Path, split: str = "train") -> Manifest:
    """Every non-blank line of ``path`` (UTF-8) becomes a declared caption-only row of ``split``; sample ids are
    line numbers (from 0), so the ids of the other lines do not move when one is edited. Blank lines are layout,
    not rows; a line that is not valid UTF-8 is a reject."""
    path = require_file(path, "caption list")
    rows, rejects = [], []
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for number, line in enumerate(fh):
            text = line.strip()
            if not text:
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                rejects.append(Reject(f"{path.name}:{number + 1}", "not valid UTF-8"))
                continue
            rows.append({"sample_id": number, "image_id": -1, "image_path": None, "caption": text, "split": split,
                         "unpaired": True, "source_row": f"{path.name}:{number + 1}"})
    return Manifest.from_rows(rows, source=f"caption list {path}", rejects=rejects)
