"""Data: read files into validated examples, split them, and build the evaluation tasks.

Three shapes: labeled texts (text, label), grouped texts (text, group[, label]) and
pairs (query, positive[, negatives]). Everything here is checked before a model is
loaded; problems are reported with the file, the row numbers and the option to change.
Training batches are drawn from these examples by `embedft.batches`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from embedft.config import Column, DataConfig

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data; the message names the file, the rows and the fix."""


@dataclass(frozen=True)
class Examples:
    """Validated rows of one split. For pairs, `texts` holds the queries."""

    shape: str
    source: str
    rows: np.ndarray  # (N,) 1-based row numbers in the source file, for messages
    texts: list[str]
    groups: list[str] | None = None  # positives share a group (grouped) or a label (labeled)
    labels: list[str] | None = None  # class labels for kNN classification
    positives: list[str] | None = None  # pairs
    negatives: list[list[str]] | None = None  # pairs, hard negatives per row

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: np.ndarray) -> "Examples":
        """A subset of rows (idx: integer positions)."""
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return replace(self, rows=self.rows[idx], texts=pick(self.texts), groups=pick(self.groups),
                       labels=pick(self.labels), positives=pick(self.positives), negatives=pick(self.negatives))

    def all_texts(self) -> list[str]:
        """Every text of the split (queries, positives and negatives for pairs)."""
        out = list(self.texts)
        if self.positives is not None:
            out += self.positives
        if self.negatives is not None:
            out += [t for ns in self.negatives for t in ns]
        return out

    def digest(self) -> str:
        """A content digest (for tracking and model cards)."""
        h = hashlib.sha256()
        for i in range(len(self)):
            for part in (self.texts[i], self.groups and self.groups[i], self.labels and self.labels[i],
                         self.positives and self.positives[i]):
                h.update(str(part).encode())
                h.update(b"\x1f")
        return h.hexdigest()[:16]


@dataclass
class DataReport:
    """Counts of what validation found and did, logged with the run."""

    counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def add(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + n


# ---------------------------------------------------------------------------------------
# Reading


FORMAT_FIX = "set data.format (csv, tsv, jsonl, parquet, disk or hub)"


def detect_format(path: str, fmt: str = "auto", format_fix: str = FORMAT_FIX) -> str:
    """The reader for a path: `fmt` unless "auto", else told by the extension (a folder: "disk")."""
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_dir():
        return "disk"
    suffix = "".join(p.suffixes[-2:]).lower() if p.suffix.lower() == ".gz" else p.suffix.lower()
    for ext, name in ((".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".json", "jsonl"),
                      (".parquet", "parquet"), (".pq", "parquet")):
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
    import pandas as pd

    fmt = detect_format(path, fmt, format_fix)
    if fmt != "hub" and not Path(path).exists():
        raise DataError(f"{path}: file not found; check data.train / data.eval (paths are relative to "
                        f"the directory you run embedft from: {Path.cwd()})")
    try:
        if fmt in ("csv", "tsv"):
            sep = "\t" if fmt == "tsv" else ","
            # index_col=False: a first data row with one field more than the header would otherwise
            # become an index silently, every column shifted one place; pandas warns instead, made an error.
            with warnings.catch_warnings():
                warnings.simplefilter("error", pd.errors.ParserWarning)
                df = pd.read_csv(path, sep=sep, header=0 if header else None, dtype=str, skip_blank_lines=False,
                                 keep_default_na=False, na_values=["", "NaN", "nan", "NA", "null", "None"],
                                 index_col=False)
            # Blank lines are skipped, but counted, so that row numbers in messages are the file's.
            blank = df.isna().all(axis=1).to_numpy()
            if blank.any():
                positions = np.flatnonzero(~blank)
                df = df[~blank].reset_index(drop=True)
                df.attrs["positions"] = positions
        elif fmt == "jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
            # pandas skips blank lines; note where the rows are, so that row numbers in messages are lines.
            with _open_bytes(path) as f:
                lines = [i for i, line in enumerate(f) if line.strip()]
            if len(lines) == len(df) and lines and lines[-1] != len(lines) - 1:
                df.attrs["positions"] = np.array(lines)
        elif fmt == "parquet":
            df = pd.read_parquet(path)
        elif fmt == "disk":
            import datasets

            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[hub_split]
            df = ds.to_pandas()
        else:  # hub: needs internet; kept for users who have it
            import datasets

            df = datasets.load_dataset(path, split=hub_split).to_pandas()
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; it needs at least one data row") from None
    except pd.errors.ParserWarning:
        raise DataError(f"{path}: the first data row has more fields than the header row; quote a text that "
                        f"contains {sep!r} (\"samsung tv{sep} 55 inch\"), and remove any {sep!r} at line ends") from None
    except UnicodeDecodeError as e:  # its position is into a chunk the parser read, not the file: find the line
        line = _first_non_utf8_line(path) if fmt in ("csv", "tsv", "jsonl") else None
        where = f"line {line}" if line else "the file"
        raise DataError(f"{path}: {where} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r}: {e.reason}); "
                        "save it as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8 OLD > NEW)") from None
    except Exception as e:  # parser errors carry the line; add the file and the fix
        fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e)) if fmt in ("csv", "tsv") else None
        if fields:
            want, line, got = fields.groups()
            first = "header row" if header else "first row"
            raise DataError(f"{path}: line {line} has {got} fields but the {first} has {want}; quote a text that "
                            f"contains {sep!r} (\"samsung tv{sep} 55 inch\"), and remove any {sep!r} at line ends") from None
        bad = _first_bad_json_line(path) if fmt == "jsonl" else None
        if bad is not None:  # pandas' JSON errors give a character position; find the line
            raise DataError(f"{path}: line {bad[0]} is not a JSON object ({bad[1]}); each line of a JSONL file must "
                            f"be one {{...}} object. If the file is not JSONL, {format_fix}") from None
        raise DataError(f"{path}: could not read as {fmt}: {e}. If it is not {fmt}, {format_fix}") from e
    if len(df) == 0:
        raise DataError(f"{path}: the file has no data rows")
    return df


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


def load_examples(path: str, cfg: DataConfig) -> Examples:
    """Read one split into Examples of the configured shape (not yet validated)."""
    fmt = detect_format(path, cfg.format)
    df = read_table(path, fmt, cfg.header, cfg.hub_split)
    rows = file_rows(df, fmt, cfg.header)

    def column(col: Column, option: str) -> list[str]:
        return text_values(_column(df, col, path, option), path, rows, f"{option}={col!r}")

    if cfg.shape == "pairs":
        texts = column(cfg.query_column, "data.query_column")
        positives = column(cfg.positive_column, "data.positive_column")
        negatives = None
        if cfg.negative_columns:
            cols = [column(c, "data.negative_columns") for c in cfg.negative_columns]
            negatives = [[c[i] for c in cols] for i in range(len(df))]
        return Examples("pairs", path, rows, texts, positives=positives, negatives=negatives)
    texts = column(cfg.text_column, "data.text_column")
    labels = None
    if cfg.label_column is not None and (cfg.shape == "labeled" or _has_column(df, cfg.label_column)):
        labels = column(cfg.label_column, "data.label_column")
    if cfg.shape == "labeled":
        return Examples("labeled", path, rows, texts, groups=labels, labels=labels)
    groups = column(cfg.group_column, "data.group_column")
    return Examples("grouped", path, rows, texts, groups=groups, labels=labels)


def _has_column(df, col: Column) -> bool:
    return (0 <= col < df.shape[1]) if isinstance(col, int) else col in df.columns


# ---------------------------------------------------------------------------------------
# Validation


def rows_str(rows: np.ndarray, limit: int = 10) -> str:
    """Row numbers for a message: the first `limit`, then how many in all."""
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return shown + (f" ... ({len(rows)} rows)" if len(rows) > limit else "")


def _apply_policy(ex: Examples, bad: np.ndarray, policy: str, option: str, what: str,
                  report: DataReport, key: str) -> Examples:
    """Act on a boolean mask of bad rows: error / warn / drop, as the policy says."""
    n = int(bad.sum())
    if n == 0:
        return ex
    report.add(key, n)
    msg = f"{ex.source}: {n} {what} at rows {rows_str(ex.rows[bad])}"
    if policy == "error":
        raise DataError(f"{msg}. Fix the data, or set {option}=drop (remove them) or {option}=warn (keep them)")
    if policy == "warn":
        report.warnings.append(msg)
        log.warning(msg)
        return ex
    log.info("%s: dropped (%s=drop)", msg, option)
    return ex.take(np.flatnonzero(~bad))


def _empty_mask(ex: Examples) -> np.ndarray:
    bad = np.array([not t.strip() for t in ex.texts], dtype=bool)
    for col in (ex.positives, ex.groups):
        if col is not None:
            bad |= np.array([not t.strip() for t in col], dtype=bool)
    return bad


def check_empty(ex: Examples, cfg: DataConfig, report: DataReport, role: str) -> Examples:
    """Empty or missing texts/groups, and labels of grouped data (labeled data's labels are its
    groups), as data.on_empty_text says (error, warn or drop)."""
    ex = _apply_policy(ex, _empty_mask(ex), cfg.on_empty_text, "data.on_empty_text",
                       "empty or missing texts/groups", report, f"{role}_empty")
    if ex.labels is not None and ex.labels is not ex.groups:
        # A missing label would otherwise be a class of its own, "", in kNN classification and loss.label_weight.
        ex = _apply_policy(ex, np.array([not t.strip() for t in ex.labels], dtype=bool), cfg.on_empty_text,
                           "data.on_empty_text", f"empty or missing labels (data.label_column={cfg.label_column!r})",
                           report, f"{role}_empty_label")
    if len(ex) == 0:
        raise DataError(f"{ex.source}: no usable rows left after removing empty texts")
    return ex


def validate_split(ex: Examples, cfg: DataConfig, report: DataReport, role: str, empty: bool = True) -> Examples:
    """Empty texts (any split, unless `empty` is false: checked before the split); single-member
    groups and duplicate texts (train only)."""
    if empty:
        ex = check_empty(ex, cfg, report, role)
    if role != "train":
        return ex
    # For pairs a row is a duplicate only when the query AND its positive repeat: one query
    # may have several positives.
    keys = ex.texts if ex.positives is None else [f"{q}\x1f{p}" for q, p in zip(ex.texts, ex.positives)]
    texts = np.array(keys, dtype=object)
    _, first = np.unique(texts, return_index=True)
    dup = np.ones(len(ex), dtype=bool)
    dup[first] = False
    ex = _apply_policy(ex, dup, cfg.on_duplicate, "data.on_duplicate", "exact duplicate texts (first kept)",
                       report, "train_duplicate")
    if ex.groups is not None:
        keys, inverse, counts = np.unique(np.array(ex.groups, dtype=object), return_inverse=True, return_counts=True)
        single = counts[inverse] == 1
        what = "labels" if ex.shape == "labeled" else "groups"
        ex = _apply_policy(ex, single, cfg.on_singleton, "data.on_singleton",
                           f"{what} with a single example (no positive to pair with)", report, "train_singleton")
    if len(ex) < 2:
        raise DataError(f"{ex.source}: fewer than 2 usable training rows after validation")
    return ex


def check_overlap(train: Examples, eval_: Examples, cfg: DataConfig, report: DataReport) -> Examples:
    """Texts present in both splits leak the answer; the policy acts on the train side."""
    eval_texts = set(eval_.all_texts())
    bad = np.array([t in eval_texts for t in train.texts], dtype=bool)
    if train.positives is not None:
        bad |= np.array([t in eval_texts for t in train.positives], dtype=bool)
    return _apply_policy(train, bad, cfg.on_overlap, "data.on_overlap", "train texts that also appear in the eval split",
                         report, "train_eval_overlap")


# ---------------------------------------------------------------------------------------
# Splits


def _stable_hash(s: str, seed: int) -> float:
    d = hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") / 2**64


def split_examples(ex: Examples, cfg: DataConfig) -> tuple[Examples, Examples]:
    """Deterministic split: whole groups (grouped), whole texts (labeled) or whole queries (pairs)."""
    if ex.shape == "grouped":
        keys = ex.groups
    else:
        keys = ex.texts
    if cfg.split == "modulo":
        if ex.shape != "grouped":
            raise DataError("data.split=modulo needs grouped data with integer group ids; use split=hash")
        try:
            is_eval = np.array([int(g) % cfg.split_modulo == 0 for g in keys], dtype=bool)
        except ValueError:
            raise DataError(f"{ex.source}: data.split=modulo needs integer group ids; use split=hash") from None
    else:
        is_eval = np.array([_stable_hash(k, cfg.split_seed) < cfg.eval_fraction for k in keys], dtype=bool)
    if is_eval.all() or not is_eval.any():
        raise DataError(f"{ex.source}: the split left one side empty; change data.eval_fraction or provide data.eval")
    return ex.take(np.flatnonzero(~is_eval)), ex.take(np.flatnonzero(is_eval))


def _subsample(ex: Examples, n: int | None, seed: int) -> Examples:
    if n is None or n >= len(ex):
        return ex
    idx = np.sort(np.random.default_rng(seed).choice(len(ex), size=n, replace=False))
    return ex.take(idx)


def load_splits(cfg: DataConfig) -> tuple[Examples, Examples, DataReport]:
    """Read, split and validate train and eval examples, as the config says."""
    if cfg.train is None:
        raise DataError("data.train is not set; point it at a CSV/TSV/JSONL/Parquet file or a dataset folder")
    report = DataReport()
    full = load_examples(cfg.train, cfg)
    if cfg.split == "given":
        train, eval_ = full, load_examples(cfg.eval, cfg)
    else:
        # Empty texts are checked in the whole file before it is split: every such row is named in
        # one message (not the eval side's first, the train side's once those are fixed), and
        # counted once, against the train file.
        full = check_empty(full, cfg, report, "train")
        train, eval_ = split_examples(full, cfg)
    train = _subsample(train, cfg.max_train_rows, cfg.split_seed)
    eval_ = _subsample(eval_, cfg.max_eval_rows, cfg.split_seed + 1)
    given = cfg.split == "given"
    eval_ = validate_split(eval_, cfg, report, "eval", empty=given)
    train = validate_split(train, cfg, report, "train", empty=given)
    train = check_overlap(train, eval_, cfg, report)
    if len(train) < 2:
        raise DataError(f"{cfg.train}: fewer than 2 training rows remain after the overlap check")
    report.counts["train_rows"] = len(train)
    report.counts["eval_rows"] = len(eval_)
    return train, eval_, report


# ---------------------------------------------------------------------------------------
# Evaluation tasks built from a split


@dataclass(frozen=True)
class RetrievalTask:
    """Queries against a corpus with relevance judgements (corpus indices per query)."""

    queries: list[str]
    corpus: list[str]
    positives: list[np.ndarray]
    self_ids: np.ndarray | None  # each query's own corpus index, excluded from its results

    def __len__(self) -> int:
        return len(self.queries)


def retrieval_task(ex: Examples, max_queries: int | None = None, seed: int = 0) -> RetrievalTask:
    """Grouped/labeled: every item with another of its group queries all others.
    Pairs: unique queries against the unique positives and negatives."""
    if ex.shape == "pairs":
        corpus_of: dict[str, int] = {}
        for t in ex.positives + [t for ns in (ex.negatives or []) for t in ns if t.strip()]:
            corpus_of.setdefault(t, len(corpus_of))
        pos_of: dict[str, set[int]] = {}
        for q, p in zip(ex.texts, ex.positives):
            pos_of.setdefault(q, set()).add(corpus_of[p])
        queries = list(pos_of)
        positives = [np.array(sorted(pos_of[q])) for q in queries]
        task = RetrievalTask(queries, list(corpus_of), positives, None)
    else:
        groups = np.array(ex.groups, dtype=object)
        _, inverse = np.unique(groups, return_inverse=True)
        members: dict[int, list[int]] = {}
        for i, g in enumerate(inverse.tolist()):
            members.setdefault(g, []).append(i)
        qidx = [i for i, g in enumerate(inverse.tolist()) if len(members[g]) > 1]
        positives = [np.array([j for j in members[inverse[i]] if j != i]) for i in qidx]
        task = RetrievalTask([ex.texts[i] for i in qidx], list(ex.texts), positives, np.array(qidx, dtype=np.int64))
    if max_queries is not None and len(task) > max_queries:
        pick = np.sort(np.random.default_rng(seed).choice(len(task), size=max_queries, replace=False))
        task = RetrievalTask([task.queries[i] for i in pick], task.corpus, [task.positives[i] for i in pick],
                             None if task.self_ids is None else task.self_ids[pick])
    return task
