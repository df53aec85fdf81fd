"""Corpus and query files for `embedft index`: ids, texts and optional labels, read as training data is."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedft.errors import SearchError

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    """Rows of a corpus or queries file: ids (the file's row numbers when id_column is None), texts, labels."""

    ids: list[str]
    texts: list[str]
    id_column: str | None
    labels: list[str] | None = None


CORPUS_FORMAT_FIX = "give the file a .csv, .tsv, .jsonl or .parquet name"


def read_corpus(path: str | Path, text_column: str = "text", id_column: str | None = "id",
                header: bool = True, label_column: str | None = None) -> Corpus:
    """A CSV/TSV/JSONL/Parquet file's rows; the file's row numbers as ids without the id column.

    Read as training data is (`data.read_table`): the same missing values, and messages give
    the file's row numbers. header=False: a CSV/TSV without a header row, whose columns are
    named by position ("0", "1", ...).
    """
    from embedft.data.readers import detect_format, file_rows, read_table
    from embedft.errors import DataError

    p = Path(path)
    if not p.is_file():
        raise SearchError(f"{p} is a folder; pass a file" if p.is_dir() else f"file {p} not found")
    try:
        fmt = detect_format(str(p), format_fix=CORPUS_FORMAT_FIX)
        if not header and fmt not in ("csv", "tsv"):
            raise SearchError(f"{p}: --no-header is for CSV/TSV files; {fmt} files name their columns")
        df = read_table(str(p), fmt, header, format_fix=CORPUS_FORMAT_FIX)
    except DataError as e:
        raise SearchError(str(e)) from e
    if not header:
        df.columns = [str(i) for i in range(df.shape[1])]
    rows = file_rows(df, fmt, header)

    def column(name: str, option: str) -> list[str]:
        return _filled_column(df, name, option, p, rows, fmt, header)

    texts = column(text_column, "--text-column")
    labels = None if label_column is None else column(label_column, "--label-column")
    if id_column and id_column in df.columns:
        ids = column(id_column, "--id-column")
        dup = sorted(i for i, c in Counter(ids).items() if c > 1)
        if dup:
            raise SearchError(f"{p}: duplicate ids in column {id_column!r}: {dup[:10]}; ids must be unique")
        return Corpus(ids, texts, id_column, labels)
    if id_column:
        log.warning("%s: no id column %r; using the file's row numbers as ids", p, id_column)
    # The row numbers messages give (a CSV's header is row 1; blank lines count), so an id is the
    # line an editor opens at, and a row refused by number is the same row a hit would name.
    return Corpus([str(int(r)) for r in rows], texts, None, labels)


def _filled_column(df, column: str, option: str, path: Path, rows: np.ndarray, fmt: str, header: bool) -> list[str]:
    # A column's values as strings; every one must be there (no blank or missing-value cell).
    from embedft.data.readers import rows_str, text_values
    from embedft.errors import DataError

    if column not in df.columns:
        hint = "" if header else " (0-based positions: the file has no header row)"
        raise SearchError(f"{path}: no column {column!r}; columns are {list(df.columns)}{hint}; pass {option}")
    try:
        values = text_values(df[column], str(path), rows, f"column {column!r} ({option})")
    except DataError as e:
        raise SearchError(str(e)) from e
    blank = np.array([not v.strip() for v in values], dtype=bool)
    if blank.any():
        missing = "empty, or NA, NaN, nan, null or None" if fmt in ("csv", "tsv") else "empty or null"
        raise SearchError(f"{path}: no {column!r} value at rows {rows_str(rows[blank])} ({missing}); "
                          f"fill those cells or drop those rows")
    return values
