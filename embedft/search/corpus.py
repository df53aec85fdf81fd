"""Corpus and query files for `embedft index`: ids, texts and optional labels, read as training data is."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

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
    from embedft.data.readers import read_table
    from embedft.errors import DataError

    p, fmt = corpus_file(path, header)
    try:
        df = read_table(str(p), fmt, header, format_fix=CORPUS_FORMAT_FIX)
    except DataError as e:
        raise SearchError(str(e)) from e
    rows = _rows(df, p, fmt, header, text_column, id_column, label_column, warn=True)
    if rows.id_column:
        dup = sorted(i for i, c in Counter(rows.ids).items() if c > 1)
        if dup:
            raise _duplicates(p, rows.id_column, dup)
    return rows


def iter_corpus(path: str | Path, text_column: str = "text", id_column: str | None = "id", header: bool = True,
                label_column: str | None = None, chunk_rows: int = 100_000) -> Iterator[Corpus]:
    """`read_corpus` of a file larger than memory: its rows `chunk_rows` at a time (`data.iter_table`).

    Each chunk is checked as `read_corpus` checks the whole file, with the same messages and the file's
    row numbers, but for duplicate ids, which `IdCheck` finds across the chunks.
    """
    from embedft.data.readers import iter_table
    from embedft.errors import DataError

    p, fmt = corpus_file(path, header)
    wanted = [c for c in (text_column, id_column, label_column) if c]
    try:
        for n, df in enumerate(iter_table(str(p), fmt, header, chunk_rows, wanted, format_fix=CORPUS_FORMAT_FIX)):
            yield _rows(df, p, fmt, header, text_column, id_column, label_column, warn=n == 0)
    except DataError as e:
        raise SearchError(str(e)) from e


def corpus_rows(path: str | Path) -> int | None:
    """At most how many rows a corpus file has, without parsing it (`data.row_bound`); None when the
    file cannot tell (its reader then says why)."""
    from embedft.data.readers import detect_format, row_bound
    from embedft.errors import DataError

    try:
        return row_bound(str(path), detect_format(str(path), format_fix=CORPUS_FORMAT_FIX))
    except (DataError, OSError, ValueError, EOFError):
        return None


class IdCheck:
    """Duplicate ids across the chunks of `iter_corpus`, in 8 bytes a row: each chunk's ids are hashed
    (`add`); `check` looks up the ids of hashes seen twice (`ids_again`: every chunk's ids, read again) and
    raises `read_corpus`'s message for true duplicates (a hash collision is not one)."""

    def __init__(self, path: Path, id_column: str | None):
        self.path, self.id_column = path, id_column
        self._hashes: list[np.ndarray] = []

    def add(self, ids: list[str]) -> None:
        if self.id_column:
            self._hashes.append(_hash_ids(ids))

    def check(self, ids_again: Callable[[], Iterable[list[str]]]) -> None:
        if not self._hashes:
            return
        h = np.sort(np.concatenate(self._hashes))
        self._hashes = []
        twice = set(h[1:][h[1:] == h[:-1]].tolist())
        if not twice:
            return
        counts = Counter(i for ids in ids_again() for i, x in zip(ids, _hash_ids(ids).tolist()) if x in twice)
        dup = sorted(i for i, c in counts.items() if c > 1)
        if dup:
            raise _duplicates(self.path, self.id_column, dup)


def _hash_ids(ids: list[str]) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(np.asarray(ids, dtype=object))  # (n,) uint64, the same in every process


def _duplicates(path: Path, id_column: str, dup: list[str]) -> SearchError:
    return SearchError(f"{path}: duplicate ids in column {id_column!r}: {dup[:10]}; ids must be unique")


def corpus_file(path: str | Path, header: bool = True) -> tuple[Path, str]:
    """A corpus file and its format, or the message that names the fix (no file there, a format its
    name does not tell, --no-header on a format that names its columns)."""
    from embedft.data.readers import detect_format
    from embedft.errors import DataError

    p = Path(path)
    if not p.is_file():
        raise SearchError(f"{p} is a folder; pass a file" if p.is_dir() else f"file {p} not found")
    try:
        fmt = detect_format(str(p), format_fix=CORPUS_FORMAT_FIX)
    except DataError as e:
        raise SearchError(str(e)) from e
    if not header and fmt not in ("csv", "tsv"):
        raise SearchError(f"{p}: --no-header is for CSV/TSV files; {fmt} files name their columns")
    return p, fmt


def _rows(df, p: Path, fmt: str, header: bool, text_column: str, id_column: str | None, label_column: str | None,
          warn: bool) -> Corpus:
    # A table's rows as a Corpus (ids unique within it); `warn`: log a missing id column.
    from embedft.data.readers import file_rows

    if not header:
        df.columns = [str(i) for i in range(df.shape[1])]
    rows = file_rows(df, fmt, header)

    def column(name: str, option: str) -> list[str]:
        return _filled_column(df, name, option, p, rows, fmt, header)

    texts = column(text_column, "--text-column")
    labels = None if label_column is None else column(label_column, "--label-column")
    if id_column and id_column in df.columns:
        return Corpus(column(id_column, "--id-column"), texts, id_column, labels)
    if id_column and warn:
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
        columns = df.attrs.get("file_columns", list(df.columns))  # a Parquet chunk holds only the columns asked for
        raise SearchError(f"{path}: no column {column!r}; columns are {columns}{hint}; pass {option}")
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
