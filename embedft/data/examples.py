"""Examples: read files into validated examples, split them, and build the retrieval task.

Three shapes: labeled texts (text, label), grouped texts (text, group[, label]) and
pairs (query, positive[, negatives]). Everything here is checked before a model is
loaded; problems are reported with the file, the row numbers and the option to change.
Training batches are drawn from these examples by `embedft.data.batches`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from dataclasses import dataclass, field, replace

import numpy as np

from embedft.config import Column, DataConfig
from embedft.data.readers import _column, _has_column, detect_format, file_rows, read_table, rows_str, text_values
from embedft.errors import DataError

log = logging.getLogger(__name__)


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
    split_keys: list[str] | None = None  # data.split_column: rows with one value stay on one side of a split

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: np.ndarray) -> "Examples":
        """A subset of rows (idx: integer positions)."""
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return replace(self, rows=self.rows[idx], texts=pick(self.texts), groups=pick(self.groups),
                       labels=pick(self.labels), positives=pick(self.positives), negatives=pick(self.negatives),
                       split_keys=pick(self.split_keys))

    def all_texts(self) -> list[str]:
        """Every text of the split (queries, positives and negatives for pairs)."""
        out = list(self.texts)
        if self.positives is not None:
            out += self.positives
        if self.negatives is not None:
            out += [t for ns in self.negatives for t in ns]
        return out

    def documents(self) -> list[str]:
        """What a retrieval corpus holds, in order: pairs' positives then their non-empty negatives; every text
        otherwise (grouped and labeled data search their own texts)."""
        if self.shape != "pairs":
            return list(self.texts)
        return self.positives + [t for ns in (self.negatives or []) for t in ns if t.strip()]

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


_DEFAULT_LABEL_COLUMN = next(f.default for f in dataclasses.fields(DataConfig) if f.name == "label_column")


def _warn_numbers(texts: list[str], path: str, what: str) -> None:
    # A column of numbers trains on digit strings: usually an id column taken for the text.
    numbers = [t for t in texts if t.strip()]
    if numbers and all(re.fullmatch(r"[-+]?\d+(\.\d+)?", t.strip()) for t in numbers):
        log.warning("%s: %s holds only numbers (%r, ...); embedft trains on them as text. If that is an id "
                    "column, point the option at the column that holds the text", path, what, numbers[0])


def load_examples(path: str, cfg: DataConfig) -> Examples:
    """Read one split into Examples of the configured shape (not yet validated)."""
    fmt = detect_format(path, cfg.format)
    df = read_table(path, fmt, cfg.header, cfg.hub_split)
    rows = file_rows(df, fmt, cfg.header)

    def column(col: Column, option: str) -> list[str]:
        return text_values(_column(df, col, path, option), path, rows, f"{option}={col!r}")

    split_keys = column(cfg.split_column, "data.split_column") if cfg.split_column is not None else None
    if cfg.shape == "pairs":
        texts = column(cfg.query_column, "data.query_column")
        _warn_numbers(texts, path, f"data.query_column={cfg.query_column!r}")
        positives = column(cfg.positive_column, "data.positive_column")
        negatives = None
        if cfg.negative_columns:
            cols = [column(c, "data.negative_columns") for c in cfg.negative_columns]
            negatives = [[c[i] for c in cols] for i in range(len(df))]
        return Examples("pairs", path, rows, texts, positives=positives, negatives=negatives, split_keys=split_keys)
    texts = column(cfg.text_column, "data.text_column")
    _warn_numbers(texts, path, f"data.text_column={cfg.text_column!r}")
    labels = None
    # Grouped data may go without labels, but a label column the user named must be there (a typo is a
    # missing column, not a setting of the label term or a silently dropped classification).
    named = cfg.label_column != _DEFAULT_LABEL_COLUMN
    if cfg.label_column is not None and (cfg.shape == "labeled" or named or _has_column(df, cfg.label_column)):
        labels = column(cfg.label_column, "data.label_column")
    if cfg.shape == "labeled":
        return Examples("labeled", path, rows, texts, groups=labels, labels=labels, split_keys=split_keys)
    groups = column(cfg.group_column, "data.group_column")
    return Examples("grouped", path, rows, texts, groups=groups, labels=labels, split_keys=split_keys)


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


def _stable_hash(s: str, seed: int | str) -> float:
    d = hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") / 2**64


def split_examples(ex: Examples, cfg: DataConfig) -> tuple[Examples, Examples]:
    """Deterministic split: whole values of data.split_column when set, else whole groups (grouped),
    whole texts (labeled) or whole queries (pairs)."""
    keys = _unit_keys(ex)
    if cfg.split == "modulo":
        if ex.shape != "grouped" and ex.split_keys is None:
            raise DataError("data.split=modulo needs grouped data with integer group ids, or integer ids in "
                            "data.split_column; use split=hash")
        try:
            is_eval = np.array([int(g) % cfg.split_modulo == 0 for g in keys], dtype=bool)
        except ValueError:
            raise DataError(f"{ex.source}: data.split=modulo needs integer group ids (or data.split_column values); "
                            "use split=hash") from None
    else:
        is_eval = np.array([_stable_hash(k, cfg.split_seed) < cfg.eval_fraction for k in keys], dtype=bool)
    if is_eval.all() or not is_eval.any():
        raise DataError(f"{ex.source}: the split left one side empty; change data.eval_fraction or provide data.eval")
    return ex.take(np.flatnonzero(~is_eval)), ex.take(np.flatnonzero(is_eval))


def _unit_keys(ex: Examples) -> list[str]:
    """What a split keeps whole: data.split_column's values, else groups (grouped data) or texts."""
    if ex.split_keys is not None:
        return ex.split_keys
    return ex.groups if ex.shape == "grouped" else ex.texts


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
        for t in ex.documents():
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
        task = RetrievalTask([ex.texts[i] for i in qidx], ex.documents(), positives, np.array(qidx, dtype=np.int64))
    if max_queries is not None and len(task) > max_queries:
        pick = np.sort(np.random.default_rng(seed).choice(len(task), size=max_queries, replace=False))
        task = RetrievalTask([task.queries[i] for i in pick], task.corpus, [task.positives[i] for i in pick],
                             None if task.self_ids is None else task.self_ids[pick])
    return task


def carve_validation(train: Examples, fraction: float, seed: int) -> tuple[Examples, Examples | None]:
    """(fit, val): a deterministic validation split carved out of the training examples, for model
    selection and early stopping without reading the eval split.

    Whole units go to one side, as the eval split does: a value of data.split_column (a product,
    say), else a group (grouped data), a query (pairs), a text (labeled data). Every label keeps
    its share: a label keeps at least two texts to train on, and gives none to validation otherwise. Units go to validation when a hash of
    them with `seed` falls below `fraction` (on small data, at least the lowest-hash unit), so the
    split does not depend on row order and a resumed run gets the same one. None when fraction is 0.
    """
    if fraction <= 0:
        return train, None
    keys = _unit_keys(train)
    # Not the eval split's hash: with data.split=hash its train side is where that hash is high.
    h = np.array([_stable_hash(k, f"val{seed}") for k in keys])
    is_val = h < fraction
    if not is_val.any():  # small data: at least the unit with the lowest hash
        is_val = h == h.min()
    if train.shape == "labeled":
        labels = np.array(train.labels, dtype=object)
        for lab in np.unique(labels):
            mine = labels == lab
            if (mine & ~is_val).sum() < 2:  # too few left to train on: the label stays whole
                is_val[mine] = False
    if not is_val.any() or is_val.all():
        what = {"grouped": "group", "pairs": "query", "labeled": "text"}[train.shape]
        raise DataError(f"{train.source}: train.val_fraction={fraction} carves {'no' if not is_val.any() else 'every'} "
                        f"{what} of the {len(train)} training rows into the validation split; "
                        f"{'raise' if not is_val.any() else 'lower'} it, or set -o train.val_fraction=0 "
                        "-o train.select_best=false -o train.patience=null to train without validation")
    return train.take(np.flatnonzero(~is_val)), train.take(np.flatnonzero(is_val))
