"""Canonical dataset manifest: one parquet table per dataset split, plus a rejects table.

Schema (one row per (image, caption) pair):
    sample_id  int64   stable id of the row (unique within the dataset)
    image_id   int64   id of the image; rows of the same image share it
    image_path string  image location, relative to the manifest's ``image_root`` unless absolute;
                       ``shard.tar::member`` addresses a member of a tar shard; null only in a caption-only row
    caption    string  null only in a declared image-only row (below)
    split      string  train / val / test / ...
    label      string  optional class label (null when the dataset has none)

Unpaired rows (transfer data for distillation) are declared by the reader with ``unpaired: True``: an image
without a caption keeps a null caption (image-only row); a caption without an image keeps a null image_path and
image_id ``CAPTION_ONLY_IMAGE_ID`` (caption-only row). A row that is not declared so and has an empty caption is
still a reject, so a missing caption is never mistaken for an unpaired image; a declared row with both or neither
is a reject too.

Parquet key-value metadata records ``source`` (what it was built from), ``image_root`` and
``content_hash`` (sha256 over the canonical columns, so caches can detect a changed manifest).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.common.errors import PipelineError
from pipeline.common import io
from pipeline.common.paths import REJECTS, manifest_path

SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("image_id", pa.int64()),
        ("image_path", pa.string()),
        ("caption", pa.string()),
        ("split", pa.string()),
        ("label", pa.string()),
    ]
)
REJECT_SCHEMA = pa.schema(
    [
        ("source_row", pa.string()),  # where the bad row came from (file:line, key, ...)
        ("image_path", pa.string()),
        ("caption", pa.string()),
        ("reason", pa.string()),
    ]
)
MANIFEST_META_KEY = b"clipdistill"
CAPTION_ONLY_IMAGE_ID = -1  # the image_id of every caption-only row (it has no image)


@dataclass
class Reject:
    source_row: str
    reason: str
    image_path: str | None = None
    caption: str | None = None


@dataclass
class Manifest:
    """An in-memory manifest (all splits or one split) with its provenance."""

    table: pa.Table
    source: str = ""
    image_root: str = ""
    rejects: list[Reject] = field(default_factory=list)

    # ---- construction -------------------------------------------------
    @classmethod
    def from_rows(
        cls,
        rows: Sequence[dict],
        source: str,
        image_root: str | Path = "",
        rejects: Iterable[Reject] = (),
    ) -> "Manifest":
        """Build from dict rows; validates them (empty captions, duplicate sample ids -> rejects). A row with
        ``unpaired: True`` is a declared image-only row: it must have no caption and is kept with a null one."""
        rejects = list(rejects)
        kept: list[dict] = []
        seen_samples: set[int] = set()
        for row in rows:
            caption = (row.get("caption") or "").strip()
            where = str(row.get("source_row", row.get("sample_id")))
            unpaired = bool(row.get("unpaired"))
            image_path = row.get("image_path") or None
            if unpaired and caption and image_path:
                rejects.append(Reject(where, "declared unpaired but has both an image and a caption",
                                      image_path, caption))
                continue
            if unpaired and not caption and not image_path:
                rejects.append(Reject(where, "declared unpaired but has neither an image nor a caption"))
                continue
            if not caption and not unpaired:
                rejects.append(Reject(where, "empty caption", row.get("image_path"), row.get("caption")))
                continue
            sid = int(row["sample_id"])
            if sid in seen_samples:
                rejects.append(Reject(where, f"duplicate sample_id {sid}", row.get("image_path"), caption))
                continue
            seen_samples.add(sid)
            kept.append(
                {
                    "sample_id": sid,
                    "image_id": int(row["image_id"]) if image_path else CAPTION_ONLY_IMAGE_ID,
                    "image_path": str(image_path) if image_path else None,
                    "caption": caption or None,
                    "split": str(row.get("split") or "train"),
                    "label": None if row.get("label") is None else str(row["label"]),
                }
            )
        table = pa.Table.from_pylist(kept, schema=SCHEMA)
        return cls(table=table, source=source, image_root=str(image_root), rejects=rejects)

    # ---- views ----------------------------------------------------------
    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def splits(self) -> list[str]:
        return sorted(set(self.table.column("split").to_pylist()))

    def split(self, name: str) -> "Manifest":
        mask = pc.equal(self.table.column("split"), name)
        return Manifest(self.table.filter(mask), self.source, self.image_root)

    def image_only_mask(self) -> np.ndarray:
        """True for the declared image-only rows (null caption)."""
        return self.table.column("caption").is_null().to_numpy(zero_copy_only=False)

    def caption_only_mask(self) -> np.ndarray:
        """True for the declared caption-only rows (null image path)."""
        return self.table.column("image_path").is_null().to_numpy(zero_copy_only=False)

    def paired(self) -> "Manifest":
        """The (image, caption) pairs, without the unpaired rows."""
        both = pc.and_(pc.is_valid(self.table.column("caption")), pc.is_valid(self.table.column("image_path")))
        return Manifest(self.table.filter(both), self.source, self.image_root)

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy(zero_copy_only=False)

    def unique_images(self) -> tuple[np.ndarray, list[str]]:
        """(image_ids sorted ascending, their image paths) - one entry per unique image (caption-only rows have
        none)."""
        ids = self.column("image_id")
        paths = self.table.column("image_path").to_pylist()
        first: dict[int, str] = {}
        for i, p in zip(ids.tolist(), paths):
            if p is not None:
                first.setdefault(i, p)
        order = sorted(first)
        return np.asarray(order, dtype=np.int64), [first[i] for i in order]

    def resolve(self, image_path: str) -> str:
        """Absolute location of an image (tar members keep their ``::member`` suffix)."""
        if not self.image_root or Path(image_path.split("::")[0]).is_absolute():
            return image_path
        return str(Path(self.image_root) / image_path)

    @functools.cached_property
    def content_hash(self) -> str:  # the table is never changed in place: a Manifest's rows are fixed
        return content_hash(self.table)

    # ---- persistence ----------------------------------------------------
    def write(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename) with provenance in the parquet metadata."""
        path = Path(path)
        meta = {"source": self.source, "image_root": self.image_root, "content_hash": self.content_hash}
        table = self.table.replace_schema_metadata({MANIFEST_META_KEY: json.dumps(meta).encode()})
        with io.atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path

    def write_rejects(self, path: str | Path) -> Path:
        return write_rejects(self.rejects, path)

    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        if not path.exists():
            raise PipelineError(f"manifest not found: {path}")
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a non-parquet file
            raise PipelineError(f"cannot read manifest {path}: {exc}") from exc
        missing = set(SCHEMA.names) - set(table.column_names)
        if missing:
            raise PipelineError(f"{path} is not a manifest: missing columns {sorted(missing)}")
        raw = (table.schema.metadata or {}).get(MANIFEST_META_KEY)
        try:
            meta = json.loads(raw) if raw else {}
        except ValueError:
            raise PipelineError(f"damaged manifest {path}: its metadata is not JSON; rebuild it (build-manifest)") \
                from None
        table = table.select(SCHEMA.names).cast(SCHEMA).replace_schema_metadata(None)
        out = cls(table=table, source=meta.get("source", ""), image_root=meta.get("image_root", ""))
        # The recorded content hash is the manifest's checksum (computed once here, then kept: caches and runs
        # ask for it again); a manifest without one was made outside this project (an input format people write),
        # so it is read as it is.
        if meta.get("content_hash") and out.content_hash != meta["content_hash"]:
            raise PipelineError(f"damaged manifest {path}: its rows differ from its recorded content_hash; "
                                "rebuild it (build-manifest)")
        if out.image_root and not Path(out.image_root).is_absolute():  # relative to the manifest file
            out.image_root = str((path.parent / out.image_root).resolve())
        return out


def content_hash(table: pa.Table) -> str:
    """sha256 over the canonical columns in row order; independent of parquet encoding details."""
    h = hashlib.sha256()
    for name in SCHEMA.names:
        col = table.column(name).to_pylist()
        h.update(name.encode())
        h.update(json.dumps(col, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def write_rejects(rejects: Sequence[Reject], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"source_row": r.source_row, "image_path": r.image_path, "caption": r.caption, "reason": r.reason}
        for r in rejects
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=REJECT_SCHEMA), path)
    return path


def read_rejects(path: str | Path) -> list[Reject]:
    t = pq.read_table(path)
    return [Reject(r["source_row"], r["reason"], r["image_path"], r["caption"]) for r in t.to_pylist()]


def write_splits(manifest: Manifest, out_dir: str | Path) -> dict[str, Path]:
    """Write ``<out_dir>/<split>.parquet`` for every split plus ``rejects.parquet``; returns the paths."""
    out_dir = Path(out_dir)
    written = {s: manifest.split(s).write(manifest_path(out_dir, s)) for s in manifest.splits}
    written["rejects"] = manifest.write_rejects(out_dir / REJECTS)
    return written


