"""Readers: a CSV/TSV/JSONL/Parquet file, a saved `datasets` folder or a hub dataset -> a table.

Every problem names the file, the line or rows, and the option that fixes it; a new
format is one reader function here plus its name in `detect_format`.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from embedft.config import Column
from embedft.errors import DataError

log = logging.getLogger(__name__)

FORMAT_FIX = "set data.format (csv, tsv, jsonl, parquet, disk or hub)"


def _csv_options(fmt: str, header: bool) -> dict:
    # Cells as strings; "", NA, NaN, nan, null and None are missing values; blank lines kept as rows (counted).
    return dict(sep="\t" if fmt == "tsv" else ",", header=0 if header else None, dtype=str, skip_blank_lines=False,
                keep_default_na=False, na_values=["", "NaN", "nan", "NA", "null", "None"], index_col=False)


def _read_delimited(path: str, header: bool, sep: str):
    import pandas as pd

    # index_col=False: a first data row with one field more than the header would otherwise
    # become an index silently, every column shifted one place; pandas warns instead, made an error.
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        df = pd.read_csv(path, **_csv_options("tsv" if sep == "\t" else "csv", header))
    # Blank lines are skipped, but counted, so that row numbers in messages are the file's.
    blank = df.isna().all(axis=1).to_numpy()
    if blank.any():
        positions = np.flatnonzero(~blank)
        df = df[~blank].reset_index(drop=True)
        df.attrs["positions"] = positions
    return df


def read_csv(path: str, header: bool, hub_split: str):
    """CSV, cells as strings; "", NA, NaN, nan, null and None are missing values."""
    return _read_delimited(path, header, ",")


def read_tsv(path: str, header: bool, hub_split: str):
    """TSV, read as CSV is."""
    return _read_delimited(path, header, "\t")


def read_jsonl(path: str, header: bool, hub_split: str):
    """One JSON object per line."""
    import pandas as pd

    df = pd.read_json(path, lines=True, dtype=False)
    # pandas skips blank lines; note where the rows are, so that row numbers in messages are lines.
    with _open_bytes(path) as f:
        lines = [i for i, line in enumerate(f) if line.strip()]
    if len(lines) == len(df) and lines and lines[-1] != len(lines) - 1:
        df.attrs["positions"] = np.array(lines)
    return df


def read_parquet(path: str, header: bool, hub_split: str):
    """A Parquet file."""
    import pandas as pd

    return pd.read_parquet(path)


def read_disk(path: str, header: bool, hub_split: str):
    """A folder saved by `datasets` (save_to_disk); of a DatasetDict, the split `hub_split`."""
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[hub_split]
    return ds.to_pandas()


def read_hub(path: str, header: bool, hub_split: str):
    """A Hugging Face hub dataset id: needs internet (kept for users who have it)."""
    import datasets

    return datasets.load_dataset(path, split=hub_split).to_pandas()


# data.format -> (path, header, hub_split) -> DataFrame. A new format: a reader above, one line
# here, its extensions in EXTENSIONS, and its name in config.FORMATS.
READERS: dict[str, Callable[[str, bool, str], Any]] = {
    "csv": read_csv, "tsv": read_tsv, "jsonl": read_jsonl, "parquet": read_parquet, "disk": read_disk,
    "hub": read_hub,
}
# File name endings -> format, for data.format=auto (first match wins; ".gz" endings too).
EXTENSIONS = ((".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".json", "jsonl"),
              (".parquet", "parquet"), (".pq", "parquet"))


def detect_format(path: str, fmt: str = "auto", format_fix: str = FORMAT_FIX) -> str:
    """The reader for a path: `fmt` unless "auto", else told by the extension (a folder: "disk")."""
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_dir():
        return "disk"
    suffix = "".join(p.suffixes[-2:]).lower() if p.suffix.lower() == ".gz" else p.suffix.lower()
    for ext, name in EXTENSIONS:
        if suffix.startswith(ext):
            return name
    if not p.exists() and "/" in path and not path.startswith((".", "/")):
        return "hub"
    raise DataError(f"{path}: cannot tell the file format from its name; {format_fix}")


def read_table(path: str, fmt: str = "auto", header: bool = True, hub_split: str = "train",
               format_fix: str = FORMAT_FIX):
    """Read a file, folder or hub dataset into a pandas DataFrame (all columns as read).

    CSV/TSV cells read as strings, with "", NA, NaN, nan, null and None as missing values.
    `format_fix` is how messages tell the user to name the format (a config option or a file name).
    """
    fmt = detect_format(path, fmt, format_fix)
    if fmt != "hub" and not Path(path).exists():
        raise DataError(f"{path}: file not found; check data.train / data.eval (paths are relative to "
                        f"the directory you run embedft from: {Path.cwd()})")
    try:
        df = READERS[fmt](path, header, hub_split)
    except Exception as e:
        raise read_error(e, path, fmt, header, format_fix)  # it sets its own cause
    if len(df) == 0:
        raise DataError(f"{path}: the file has no data rows")
    return df


# The formats `iter_table` reads a chunk at a time (a folder or hub dataset is read whole).
CHUNKED_FORMATS = ("csv", "tsv", "jsonl", "parquet")


def iter_table(path: str, fmt: str, header: bool, chunk_rows: int, columns: list[str] | None = None,
               format_fix: str = FORMAT_FIX) -> Iterator[Any]:
    """`read_table` of a CSV/TSV/JSONL/Parquet file, `chunk_rows` rows at a time (DataFrames), for a file
    larger than memory: the same cells and missing values, the same messages.

    Each chunk's `attrs["positions"]` are its rows' 0-based places in the whole file, so `file_rows` gives
    the file's row numbers. A CSV/TSV chunk is `chunk_rows` records before its blank lines are dropped, a
    JSONL chunk `chunk_rows` lines, a Parquet chunk `chunk_rows` rows of only `columns` (those the file has;
    `attrs["file_columns"]` names all of its columns). The chunks are the same on every read of a file.
    """
    fmt = detect_format(path, fmt, format_fix)
    if fmt not in CHUNKED_FORMATS:
        raise DataError(f"{path}: a {fmt} source is read whole, not in chunks; give a .csv, .tsv, .jsonl or .parquet file")
    if not Path(path).exists():
        raise DataError(f"{path}: file not found")
    chunks = {"csv": _csv_chunks, "tsv": _csv_chunks, "jsonl": _jsonl_chunks, "parquet": _parquet_chunks}[fmt]
    rows = 0
    try:
        for df in chunks(path, fmt, header, chunk_rows, columns):
            if len(df):  # a chunk of blank lines only is no chunk
                rows += len(df)
                yield df
    except Exception as e:
        raise read_error(e, path, fmt, header, format_fix)  # it sets its own cause
    if rows == 0:
        raise DataError(f"{path}: the file has no data rows")


def _csv_chunks(path: str, fmt: str, header: bool, chunk_rows: int, columns):
    import pandas as pd

    # As `_read_delimited`, strict only around the parser's own calls: the caller runs between chunks.
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        reader = pd.read_csv(path, **_csv_options(fmt, header), chunksize=chunk_rows)
    with reader:
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("error", pd.errors.ParserWarning)
                df = next(reader, None)
            if df is None:
                return
            # A row's index is its record number in the file, blank lines included (dropped, but counted).
            positions = df.index.to_numpy()
            blank = df.isna().all(axis=1).to_numpy()
            df = df[~blank].reset_index(drop=True)
            df.attrs["positions"] = positions[~blank]
            yield df


def _jsonl_chunks(path: str, fmt: str, header: bool, chunk_rows: int, columns):
    import io
    import itertools

    import pandas as pd

    with _open_bytes(path) as f:
        first = 0
        while True:
            lines = list(itertools.islice(f, chunk_rows))
            if not lines:
                return
            full = [i for i, line in enumerate(lines) if line.strip()]  # blank lines are skipped, but counted
            if full:
                df = pd.read_json(io.BytesIO(b"".join(lines[i] for i in full)), lines=True, dtype=False)
                df.attrs["positions"] = np.asarray(full, dtype=np.int64) + first
                yield df
            first += len(lines)


def _parquet_chunks(path: str, fmt: str, header: bool, chunk_rows: int, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    keep = names if columns is None else [c for c in names if c in columns]
    first, pending = 0, []

    def frame(table):
        df = table.to_pandas()
        df.attrs.update(positions=np.arange(first, first + len(df)), file_columns=names)
        return df

    # Batches end at row groups: gather them into chunks of chunk_rows rows.
    for batch in pf.iter_batches(batch_size=chunk_rows, columns=keep):
        pending.append(batch)
        while sum(b.num_rows for b in pending) >= chunk_rows:
            table = pa.Table.from_batches(pending)
            yield frame(table.slice(0, chunk_rows))
            first += chunk_rows
            pending = table.slice(chunk_rows).to_batches()
    if sum(b.num_rows for b in pending):
        yield frame(pa.Table.from_batches(pending))


def row_bound(path: str, fmt: str) -> int | None:
    """At most how many rows a file has, found without parsing it: a Parquet file's own count, the lines of a
    CSV/TSV/JSONL file (a header, blank lines and multi-line cells make it an over-count); None for others."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if fmt not in ("csv", "tsv", "jsonl"):
        return None
    lines, last = 0, b"\n"
    with _open_bytes(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def read_error(e: Exception, path: str, fmt: str, header: bool, format_fix: str = FORMAT_FIX) -> DataError:
    """The DataError for an exception a reader raised: the file, the line where it can be found, and the fix
    (`read_table`'s and `iter_table`'s). Parser errors of their own become plain messages; others keep theirs
    as the cause."""
    import pandas as pd

    if isinstance(e, DataError):
        return e
    sep = "\t" if fmt == "tsv" else ","
    err = None
    if isinstance(e, pd.errors.EmptyDataError):
        err = DataError(f"{path}: the file is empty; it needs at least one data row")
    elif isinstance(e, pd.errors.ParserWarning):
        err = DataError(f"{path}: the first data row has more fields than the header row; quote a text that "
                        f"contains {sep!r} (\"samsung tv{sep} 55 inch\"), and remove any {sep!r} at line ends")
    elif isinstance(e, UnicodeDecodeError):  # its position is into a chunk the parser read, not the file: find the line
        line = _first_non_utf8_line(path) if fmt in ("csv", "tsv", "jsonl") else None
        where = f"line {line}" if line else "the file"
        err = DataError(f"{path}: {where} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r}: {e.reason}); "
                        "save it as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8 OLD > NEW)")
    else:  # parser errors carry the line; add the file and the fix
        fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e)) if fmt in ("csv", "tsv") else None
        bad = _first_bad_json_line(path) if fmt == "jsonl" and not fields else None
        if fields:
            want, line, got = fields.groups()
            first = "header row" if header else "first row"
            err = DataError(f"{path}: line {line} has {got} fields but the {first} has {want}; quote a text that "
                            f"contains {sep!r} (\"samsung tv{sep} 55 inch\"), and remove any {sep!r} at line ends")
        elif bad is not None:  # pandas' JSON errors give a character position; find the line
            err = DataError(f"{path}: line {bad[0]} is not a JSON object ({bad[1]}); each line of a JSONL file must "
                            f"be one {{...}} object. If the file is not JSONL, {format_fix}")
    if err is None:
        err = DataError(f"{path}: could not read as {fmt}: {e}. If it is not {fmt}, {format_fix}")
        err.__cause__ = e
    err.__suppress_context__ = True
    return err


def _first_bad_json_line(path: str) -> tuple[int, str] | None:
    import json

    with _open_bytes(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue  # pandas skips blank lines
            try:
                value = json.loads(line.strip())
            except json.JSONDecodeError as e:
                return number, f"{e.msg} at column {e.colno}"
            except ValueError as e:
                return number, str(e)
            if not isinstance(value, dict):
                return number, f"a {type(value).__name__}"
    return None


def _open_bytes(path: str):
    import gzip

    return (gzip.open if path.lower().endswith(".gz") else open)(path, "rb")


def _first_non_utf8_line(path: str) -> int | None:
    # Line by line: a newline byte never occurs inside a multi-byte UTF-8 character.
    with _open_bytes(path) as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


def _column(df, col: Column, path: str, option: str):
    if isinstance(col, int):
        if not 0 <= col < df.shape[1]:
            raise DataError(f"{path}: {option}={col} but the file has {df.shape[1]} columns (0-based index)")
        return df.iloc[:, col]
    if col not in df.columns:
        names = ", ".join(map(str, df.columns))
        if df.shape[1] == 1 and any(sep in str(df.columns[0]) for sep in (",", "\t")):
            hint = " (one column whose name holds separators: the file uses another one; set data.format=csv or tsv)"
        elif all(str(c).isdigit() for c in df.columns):  # data.header=false (or a JSON array, one column 0)
            hint = f" (without a header row columns are numbered: set {option} to 0..{df.shape[1] - 1})" \
                if df.shape[1] > 1 else ""
        else:
            hint = " (the file may have no header row: set data.header=false and use column numbers)"
        raise DataError(f"{path}: missing column {col!r} for {option}; columns are: {names}{hint}")
    return df[col]


def file_rows(df, fmt: str, header: bool) -> np.ndarray:
    """Each DataFrame row's row number in its file, as messages give it: the line for CSV/TSV
    (the header is line 1; blank lines count) and JSONL, 1-based otherwise."""
    first = 2 if header and fmt in ("csv", "tsv") else 1
    return np.asarray(df.attrs.get("positions", np.arange(len(df)))) + first


def text_values(series, path: str, rows: np.ndarray, what: str) -> list[str]:
    """A column's cells as strings; a missing cell is "" (None, NaN), an integral float its int.
    A cell holding a list or an object (JSONL, Parquet) is refused, naming `what` and the file's rows."""
    values = series.tolist()
    nested = np.array([isinstance(v, (list, tuple, dict, np.ndarray)) for v in values], dtype=bool)
    if nested.any():
        raise DataError(f"{path}: {what} holds lists or objects instead of texts at rows {rows_str(rows[nested])}; "
                        f"give one text per cell")
    # An int id column with a missing value comes back as floats from JSONL/Parquet: 7.0 -> "7", as in a CSV.
    return ["" if v is None or (isinstance(v, float) and math.isnan(v))
            else str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in values]


def _has_column(df, col: Column) -> bool:
    return (0 <= col < df.shape[1]) if isinstance(col, int) else col in df.columns


def rows_str(rows: np.ndarray, limit: int = 10) -> str:
    """Row numbers for a message: the first `limit`, then how many in all."""
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return shown + (f" ... ({len(rows)} rows)" if len(rows) > limit else "")
