"""CSV / TSV / parquet tables with one (image, caption) pair per row.

Several captions of one image are several rows with the same image path. Ids, when the table
has no id columns, are derived so that they depend only on the table's image column and row
order: ``image_id`` numbers image paths by first appearance (counting every row with an image
path, even rows rejected for other reasons, so fixing one bad row does not renumber the rest) and
``sample_id`` is the 0-based data row number.

``source_row`` is ``file.csv:LINE`` (1-based line where the record starts; the header is line 1)
for text tables and ``file.parquet:ROW`` (0-based row index) for parquet.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import pyarrow.parquet as pq

from pipeline.common.errors import PipelineError
from pipeline.data.manifest import Manifest, Reject
from pipeline.data.readers.common import (
    ImageIdRegistry,
    ImageLocator,
    as_int_id,
    assign_split,
    describe_source,
    parse_split_fractions,
    require_dir,
    require_file,
)

DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
PARQUET_SUFFIXES = (".parquet", ".pq")

# (source_row, {column: value} or None, problem or None)
Record = tuple[str, "dict[str, object] | None", "str | None"]


def read_tabular(
    path: str | Path,
    image_root: str | Path | None = None,
    image_col: str = "image_path",
    caption_col: str = "caption",
    split_col: str | None = None,
    label_col: str | None = None,
    image_id_col: str | None = None,
    sample_id_col: str | None = None,
    split_fractions: str | Mapping[str, float] | None = None,
    delimiter: str | None = None,
    unpaired_col: str | None = None,
) -> Manifest:
    """Read a table of image paths and captions.

    Args:
        path: ``.csv``, ``.tsv``/``.tab`` or ``.parquet`` file (another suffix needs ``delimiter``).
        image_root: folder relative image paths are resolved against; defaults to the table's folder.
        image_col, caption_col: required columns.
        split_col, label_col, image_id_col, sample_id_col: optional columns.
        split_fractions: hash-based split assignment when there is no split column (see
            ``common.assign_split``); default: every row is ``train``.
        delimiter: field separator for text tables. TSV is read without quote handling (captions
            often contain bare ``"``), CSV with standard quoting.
        unpaired_col: optional flag column (1/true/yes vs 0/false/no/empty): a flagged row is a declared unpaired
            row (transfer data): an image with an empty caption (image-only), or a caption with an empty image
            path (caption-only); a flagged row with both is a reject.
    """
    path = require_file(path, "table")
    root = require_dir(image_root, "image root") if image_root is not None else path.parent
    fractions = parse_split_fractions(split_fractions)
    if split_col and fractions:
        raise PipelineError("give either a split column or split fractions, not both")
    cols = _Columns(image_col, caption_col, split_col, label_col, image_id_col, sample_id_col, unpaired_col)

    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES and delimiter is None:
        records = _parquet_records(path, cols.wanted)
    elif delimiter is not None or suffix in DELIMITERS:
        records = _text_records(path, cols.wanted, delimiter or DELIMITERS[suffix])
    else:
        raise PipelineError(f"unknown table type {path.name}: use .csv, .tsv or .parquet or give a delimiter")

    builder = _RowBuilder(cols, ImageLocator(root), fractions)
    rows: list[dict] = []
    rejects: list[Reject] = []
    for row_index, (where, rec, problem) in enumerate(records):
        result = builder.build(row_index, where, rec, problem)
        (rejects if isinstance(result, Reject) else rows).append(result)
    options = {
        "image_root": root, "image_col": image_col, "caption_col": caption_col, "split_col": split_col,
        "label_col": label_col, "image_id_col": image_id_col, "sample_id_col": sample_id_col,
        "split_fractions": fractions, "delimiter": delimiter, "unpaired_col": unpaired_col,
    }
    source = describe_source("tabular", path, **{k: v for k, v in options.items() if v is not None})
    return Manifest.from_rows(rows, source=source, image_root=root, rejects=rejects)


@dataclass(frozen=True)
class _Columns:
    image: str
    caption: str
    split: str | None
    label: str | None
    image_id: str | None
    sample_id: str | None
    unpaired: str | None = None

    @property
    def wanted(self) -> list[str]:
        names = (self.image, self.caption, self.split, self.label, self.image_id, self.sample_id, self.unpaired)
        return list(dict.fromkeys(n for n in names if n))


class _RowBuilder:
    """Turns table records into manifest rows or rejects, keeping id state across rows."""

    def __init__(self, cols: _Columns, locator: ImageLocator, fractions: dict[str, float] | None) -> None:
        self.cols, self.locator, self.fractions = cols, locator, fractions
        self.registry = ImageIdRegistry()
        self.derived_image_ids: dict[str, int] = {}

    def build(self, row_index: int, where: str, rec: dict | None, problem: str | None) -> dict | Reject:
        cols = self.cols
        if rec is None:
            return Reject(where, problem or "malformed row")
        raw_image, caption = rec[cols.image], rec[cols.caption]
        has_path = isinstance(raw_image, str) and raw_image.strip()
        rel = self.locator.relative(raw_image.strip()) if has_path else None
        if rel is not None:  # numbered before any other check, see the module docstring
            self.derived_image_ids.setdefault(rel, len(self.derived_image_ids))
        text = caption if isinstance(caption, str) else None
        checked = self._check(row_index, rec, rel, problem)
        if isinstance(checked, str):
            return Reject(where, checked, rel, text)
        return {**checked, "image_path": rel, "caption": text, "source_row": where}

    def _check(self, row_index: int, rec: dict, rel: str | None, problem: str | None) -> str | dict:
        """The reject reason, or the row's ids, split and label."""
        cols = self.cols
        raw_image, caption = rec[cols.image], rec[cols.caption]
        if problem:
            return problem
        if rel is None:
            flagged = _flag(rec[cols.unpaired]) if cols.unpaired else False
            if flagged and (raw_image is None or isinstance(raw_image, str)) and isinstance(caption, str) \
                    and caption.strip():
                return self._caption_only(row_index, rec)
            if raw_image is None or isinstance(raw_image, str):
                return "missing image path"
            return f"image path is not a string ({type(raw_image).__name__})"
        if caption is not None and not isinstance(caption, str):
            return f"caption is not a string ({type(caption).__name__})"
        image_id = as_int_id(rec[cols.image_id]) if cols.image_id else self.derived_image_ids[rel]
        if image_id is None:
            return f"invalid image_id {rec[cols.image_id]!r}"
        sample_id = as_int_id(rec[cols.sample_id]) if cols.sample_id else row_index
        if sample_id is None:
            return f"invalid sample_id {rec[cols.sample_id]!r}"
        if cols.split:
            split = rec[cols.split]
            if not isinstance(split, str) or not split.strip():
                return f"missing split in column {cols.split!r}"
            split = split.strip()
        else:
            split = assign_split(rel, self.fractions)
        conflict = self.registry.claim(image_id, rel)
        if conflict:
            return conflict
        if not self.locator.exists(rel):
            return self.locator.missing_reason(rel)
        label = rec[cols.label] if cols.label else None
        if isinstance(label, str):
            label = label.strip() or None
        unpaired = _flag(rec[cols.unpaired]) if cols.unpaired else False
        if unpaired is None:
            return f"invalid unpaired flag {rec[cols.unpaired]!r} in column {cols.unpaired!r} (use 1/0, true/false)"
        return {"sample_id": sample_id, "image_id": image_id, "split": split, "label": label, "unpaired": unpaired}


    def _caption_only(self, row_index: int, rec: dict) -> str | dict:
        """A flagged row with a caption and no image: a declared caption-only row (its ids, split, label)."""
        cols = self.cols
        sample_id = as_int_id(rec[cols.sample_id]) if cols.sample_id else row_index
        if sample_id is None:
            return f"invalid sample_id {rec[cols.sample_id]!r}"
        split = rec[cols.split].strip() if cols.split and isinstance(rec[cols.split], str) else None
        if cols.split and not split:
            return f"missing split in column {cols.split!r}"
        # without a split column a caption-only row goes to train: it has no image path to hash into a split
        return {"sample_id": sample_id, "image_id": -1, "split": split or "train", "label": None, "unpaired": True}


_TRUE, _FALSE = {"1", "true", "yes", "y"}, {"", "0", "false", "no", "n"}


def _flag(value) -> bool | None:
    """A table's boolean flag: True, False, or None when it is neither."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def _check_columns(path: Path, present: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        raise PipelineError(f"{path.name}: missing column(s) {missing}; columns are {present}")
    dupes = sorted({c for c in wanted if present.count(c) > 1})
    if dupes:
        raise PipelineError(f"{path.name}: column(s) {dupes} appear more than once in the header")


def _parquet_records(path: Path, wanted: list[str]) -> Iterator[Record]:
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise PipelineError(f"cannot read parquet {path}: {exc}") from None
    _check_columns(path, list(schema.names), wanted)
    try:
        table = pq.read_table(path, columns=wanted)
    except Exception as exc:
        raise PipelineError(f"cannot read parquet {path}: {exc}") from None
    data = {c: table.column(c).to_pylist() for c in wanted}
    for i in range(table.num_rows):
        yield f"{path.name}:{i}", {c: data[c][i] for c in wanted}, None


def _text_records(path: Path, wanted: list[str], delimiter: str) -> Iterator[Record]:
    # surrogateescape: a row with bad bytes becomes one reject instead of aborting the whole file.
    try:
        fh = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise PipelineError(f"cannot read table {path}: {exc}") from None
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long captions are fine; the default is 128 KiB
    with fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader)
        except StopIteration:
            raise PipelineError(f"{path.name}: empty table (no header row)") from None
        except (csv.Error, OSError) as exc:
            raise PipelineError(f"cannot read table {path}: {exc}") from None
        header = [h.strip() for h in header]
        _check_columns(path, header, wanted)
        index = {c: header.index(c) for c in wanted}
        while True:
            start = reader.line_num + 1
            where = f"{path.name}:{start}"
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                if reader.line_num < start:  # the reader did not advance: stop rather than loop
                    raise PipelineError(f"cannot read table {path} at line {start}: {exc}") from None
                yield where, None, f"malformed row: {exc}"
                continue
            if not fields:  # blank line
                continue
            if len(fields) != len(header):
                yield where, None, f"malformed row: expected {len(header)} fields, got {len(fields)}"
                continue
            rec = {c: fields[i] for c, i in index.items()}
            bad = [c for c, v in rec.items() if not _is_valid_utf8(v)]
            if bad:  # keep the text readable (and writable to parquet) in the reject record
                rec = {c: _replace_bad_bytes(v) for c, v in rec.items()}
                yield where, rec, f"column(s) {bad} are not valid UTF-8"
            else:
                yield where, rec, None


def _is_valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _replace_bad_bytes(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
