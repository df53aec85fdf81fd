"""Training batches: examples as ids into one table of unique texts, and the batches of each epoch.

A batch is a pure function of (seed, epoch), so a resumed run replays the same batches. Samplings:
random anchors, one label per batch (`by_label`), and whole groups laid end to end (`groups`,
`similar_groups` with neighbouring groups side by side for hard in-batch negatives).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from embedft.config import GROUP_SAMPLINGS, TrainConfig, resolve_batch_sampling, resolve_epochs
from embedft.data.examples import Examples
from embedft.errors import ConfigError, DataError


@dataclass(frozen=True)
class PairSource:
    """Training examples as ids into one table of unique texts.

    Each anchor has a key; texts with the same key are positives of each other and are
    never used as in-batch negatives for one another.
    """

    texts: list[str]  # unique texts
    anchors: np.ndarray  # (N,) text ids
    anchor_keys: np.ndarray  # (N,) int
    text_keys: np.ndarray  # (T,) int key of each text (-1: none)
    members: dict[int, np.ndarray] | None  # key -> text ids (grouped/labeled)
    positives: np.ndarray | None  # (N,) text ids (pairs)
    negatives: np.ndarray | None  # (N, H) text ids (pairs), -1 padded
    batch_labels: np.ndarray | None  # (N,) int, for by_label sampling
    shape: str = "grouped"  # of the examples: labeled, grouped or pairs (train.batch_sampling=auto follows it)
    # (T, W) every key of each text, -1 padded: W > 1 where one text is of several groups or labels (one
    # title on two products), of which `text_keys` holds only one. The losses' false-negative masks test
    # these sets; None means one key per text (`text_keys`).
    key_sets: np.ndarray | None = None

    @functools.cached_property
    def keys(self) -> np.ndarray:
        """(T, W) each text's keys for a false-negative mask: `key_sets`, else `text_keys` as one column."""
        return self.text_keys[:, None] if self.key_sets is None else self.key_sets

    @property
    def n_anchors(self) -> int:
        return len(self.anchors)

    def digest(self) -> str:
        """A content digest of what training draws from (texts, anchors, keys, pairs): a resumed
        run must see the same."""
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode())
            h.update(b"\x1f")
        for a in (self.anchors, self.anchor_keys, self.positives, self.negatives, self.batch_labels):
            h.update(b"-" if a is None else np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def build_pair_source(ex: Examples) -> PairSource:
    """Turn validated training examples into a PairSource."""
    table: dict[str, int] = {}

    def tid(t: str) -> int:
        return table.setdefault(t, len(table))

    if ex.shape == "pairs":
        anchors = np.array([tid(t) for t in ex.texts])
        positives = np.array([tid(t) for t in ex.positives])
        negatives = None
        if ex.negatives:
            width = max(len(n) for n in ex.negatives)
            negatives = np.full((len(ex), width), -1, dtype=np.int64)
            for i, ns in enumerate(ex.negatives):
                for j, t in enumerate(ns):
                    if t.strip():
                        negatives[i, j] = tid(t)
        # Rows connected by a shared query or a shared positive are positives of each other,
        # so none of them may be another's negative: key = connected component of (query, positive).
        root = np.arange(len(table))

        def find(i: int) -> int:
            while root[i] != i:
                root[i] = root[root[i]]
                i = root[i]
            return i

        for a, p in zip(anchors.tolist(), positives.tolist()):
            root[find(a)] = find(p)
        comp = np.array([find(i) for i in range(len(table))], dtype=np.int64)
        anchor_keys = comp[anchors]
        text_keys = np.full(len(table), -1, dtype=np.int64)
        text_keys[positives] = comp[positives]
        text_keys[anchors] = anchor_keys
        if negatives is None:
            _check_contrast(ex, anchor_keys, "every query and positive is linked to every other through shared texts")
        return PairSource(list(table), anchors, anchor_keys, text_keys, None, positives, negatives, None, "pairs")

    key_of: dict[str, int] = {}
    anchors = np.array([tid(t) for t in ex.texts])
    anchor_keys = np.array([key_of.setdefault(g, len(key_of)) for g in ex.groups])
    text_keys = np.full(len(table), -1, dtype=np.int64)
    text_keys[anchors] = anchor_keys
    key_sets = _key_sets(len(table), anchors, anchor_keys)
    members: dict[int, list[int]] = {}
    for a, k in zip(anchors.tolist(), anchor_keys.tolist()):
        members.setdefault(k, []).append(a)
    members_np = {k: np.unique(np.array(v)) for k, v in members.items()}
    # Anchors need at least one other member to pair with.
    keep = np.array([len(members_np[k]) >= 2 for k in anchor_keys.tolist()], dtype=bool)
    batch_labels = None
    if ex.labels is not None:
        lab_of: dict[str, int] = {}
        batch_labels = np.array([lab_of.setdefault(lab, len(lab_of)) for lab in ex.labels])[keep]
    if not keep.any():
        raise DataError(f"{ex.source}: no label or group has two different texts, so there are no positive pairs")
    what = "label" if ex.shape == "labeled" else "group"
    _check_contrast(ex, anchor_keys[keep], f"every training text with a positive has the same {what} "
                                           f"({ex.groups[int(np.flatnonzero(keep)[0])]!r})")
    return PairSource(list(table), anchors[keep], anchor_keys[keep], text_keys, members_np, None, None, batch_labels,
                      ex.shape, key_sets)


def _key_sets(n_texts: int, text_ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(n_texts, W) the distinct keys of each text, -1 padded; W is the most any text has (at least 1)."""
    pairs = np.unique(np.stack([text_ids, keys], axis=1), axis=0)  # (text, key), each once, sorted by text
    counts = np.bincount(pairs[:, 0], minlength=n_texts)
    out = np.full((n_texts, max(1, int(counts.max(initial=0)))), -1, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out[pairs[:, 0], np.arange(len(pairs)) - starts[pairs[:, 0]]] = pairs[:, 1]
    return out


def _check_contrast(ex: Examples, anchor_keys: np.ndarray, why: str) -> None:
    """A clear error when all anchors share one key: each text is then every other's positive,
    no text is a negative, and the contrastive loss is 0 from the first step (nothing is learned)."""
    if len(np.unique(anchor_keys)) < 2:
        raise DataError(f"{ex.source}: {why}, so no text is a negative for another and the contrastive loss is 0 "
                        "(nothing would be learned); training needs at least two labels/groups with two texts each "
                        "(check data.label_column / data.group_column, or add hard negatives with "
                        "data.negative_columns for pairs)")


@dataclass(frozen=True)
class Batch:
    """Text ids for one step. Candidates for anchor i are all positives and negatives."""

    anchors: np.ndarray  # (B,)
    # (B,), or None for a group batch: every text is an anchor and its positives are the
    # other texts of its key in the batch (`group_batches`)
    positives: np.ndarray | None
    negatives: np.ndarray | None  # (B, H), -1 where missing
    anchor_keys: np.ndarray  # (B,)
    anchor_labels: np.ndarray | None = None  # (B,) label ids (grouped data with labels); positives share them


def anchors_per_epoch(src: PairSource, sampling: str = "random", group_size: int = 4) -> int:
    """Anchors one epoch draws from: every anchor, or for group batches every text of each group
    that can train (`group_batches` lays all of a group's texts, `group_size` at a time)."""
    if sampling in GROUP_SAMPLINGS:
        return int(sum(len(src.members[k]) for k in group_keys(src).tolist()))
    return src.n_anchors


def check_schedule(src: PairSource, cfg: TrainConfig, source: str = "training data") -> int:
    """The run's optimizer steps; a clear error, naming `source`, when one epoch has fewer anchors
    than a batch or the warmup is longer than the whole run."""
    n = anchors_per_epoch(src, resolve_batch_sampling(cfg.batch_sampling, src.shape), cfg.group_size)
    if n < cfg.batch_size:
        raise DataError(f"{source}: train.batch_size={cfg.batch_size} is larger than the {n} training anchors per "
                        f"epoch (texts with a positive); lower train.batch_size to at most {n}")
    per_epoch = n // cfg.batch_size
    epochs = resolve_epochs(cfg.epochs, src.shape)
    steps = min(epochs * per_epoch, cfg.max_steps or epochs * per_epoch)
    if cfg.warmup_steps is not None and cfg.warmup_steps > steps:
        raise ConfigError(f"train.warmup_steps={cfg.warmup_steps} is longer than the {steps} training steps "
                          f"({epochs} epochs x {per_epoch} batches of {cfg.batch_size} from {source}); "
                          f"lower train.warmup_steps or use train.warmup_ratio")
    return steps


def steps_per_epoch(src: PairSource, batch_size: int, sampling: str = "random", group_size: int = 4) -> int:
    """Full batches per epoch (a ragged last batch is dropped: it would have fewer negatives)."""
    return anchors_per_epoch(src, sampling, group_size) // batch_size


def epoch_batches(src: PairSource, batch_size: int, seed: int, epoch: int, sampling: str = "random",
                  hard_negatives: int = 0, mined: np.ndarray | None = None, group_size: int = 4,
                  neighbours: np.ndarray | None = None) -> Iterator[Batch]:
    """Batches of one epoch, a pure function of (seed, epoch) so a resumed run replays them exactly."""
    if sampling in GROUP_SAMPLINGS:
        yield from group_batches(src, batch_size, seed, epoch, group_size,
                                 neighbours if sampling == "similar_groups" else None)
        return
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(src.n_anchors)
    if sampling == "by_label" and src.batch_labels is not None:
        # Batches drawn from one label: in-batch negatives are then the hard, same-category ones.
        chunks = []
        for lab in np.unique(src.batch_labels):
            idx = order[src.batch_labels[order] == lab]
            chunks += [idx[i:i + batch_size] for i in range(0, len(idx) - batch_size + 1, batch_size)]
        leftovers = np.setdiff1d(order, np.concatenate(chunks) if chunks else np.array([], dtype=int))
        leftovers = rng.permutation(leftovers)
        chunks += [leftovers[i:i + batch_size] for i in range(0, len(leftovers) - batch_size + 1, batch_size)]
        batches = [chunks[i] for i in rng.permutation(len(chunks))]
    else:
        batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    for idx in batches:
        anchors = src.anchors[idx]
        keys = src.anchor_keys[idx]
        if src.positives is not None:
            positives = src.positives[idx]
        else:
            positives = np.empty(len(idx), dtype=np.int64)
            for j, (a, k) in enumerate(zip(anchors.tolist(), keys.tolist())):
                positives[j] = _other_member(src.members[k], a, rng)
        negatives = None
        if hard_negatives > 0:
            if src.negatives is not None:
                negatives = src.negatives[idx, :hard_negatives]
            elif mined is not None:
                negatives = mined[idx, :hard_negatives]
        labels = src.batch_labels[idx] if src.batch_labels is not None and src.positives is None else None
        yield Batch(anchors, positives, negatives, keys, labels)


def group_keys(src: PairSource) -> np.ndarray:
    """Keys of the groups that can train (two or more distinct texts), sorted."""
    if src.members is None:
        raise DataError("batch_sampling groups/similar_groups needs grouped or labeled data (shape: grouped or "
                        "labeled); pairs data has no groups: use train.batch_sampling=random")
    return np.unique(src.anchor_keys)


# Groups per run of neighbours in a similar_groups batch: enough for every text to meet hard
# negatives, few enough that a batch still spans several neighbourhoods (and categories).
NEIGHBOUR_RUN = 8


def group_batches(src: PairSource, batch_size: int, seed: int, epoch: int, group_size: int = 4,
                  neighbours: np.ndarray | None = None) -> Iterator[Batch]:
    """Batches of groups: every text of every group once per epoch, each group's texts (a fresh
    shuffle each epoch) laid together in pieces of `group_size` to 2 x `group_size` - 1 texts
    (`group_pieces`), the pieces in random order, cut every `batch_size` texts.

    Every text is an anchor and the other texts of its group in the batch are its positives, so
    one forward pass per text serves both roles (pairs need anchor + positive passes). A group
    of many texts (a label of labeled data) gives many pieces, so an epoch covers the data: 77
    labels of 130 texts are 2,500 pieces of 4, not 77. With `neighbours` ((n_groups, m) positions
    into `group_keys(src)`, nearest first) the pieces go in runs of NEIGHBOUR_RUN neighbouring
    groups (the i-th piece of each group of a run together), so in-batch negatives are hard ones
    (the 128GB variant next to the 64GB phone) at no extra forward pass. Only the ragged last
    batch (fewer than `batch_size` texts) is left out.
    """
    rng = np.random.default_rng([seed, epoch])
    keys = group_keys(src)
    order = rng.permutation(len(keys))
    pieces = [group_pieces(rng.permutation(src.members[int(k)]), group_size) for k in keys.tolist()]
    runs = _neighbour_run_list(order, neighbours) if neighbours is not None else [[g] for g in order.tolist()]
    blocks = []  # texts laid together: one piece, or the r-th pieces of a run of neighbouring groups
    for r in range(max(len(p) for p in pieces)):
        for run in runs:
            block = [(g, pieces[g][r]) for g in run if r < len(pieces[g])]
            if block:
                blocks.append(block)
    text_labels = None
    if src.batch_labels is not None:
        text_labels = np.full(len(src.texts), -1, dtype=np.int64)
        text_labels[src.anchors] = src.batch_labels
    ids, id_keys = [], []
    for b in rng.permutation(len(blocks)).tolist():
        for g, piece in blocks[b]:
            ids.append(piece)
            id_keys.append(np.full(len(piece), keys[g], dtype=np.int64))
    flat, flat_keys = np.concatenate(ids), np.concatenate(id_keys)
    for i in range(0, len(flat) - batch_size + 1, batch_size):
        texts = flat[i:i + batch_size]
        yield Batch(texts, None, None, flat_keys[i:i + batch_size],
                    text_labels[texts] if text_labels is not None else None)


def group_pieces(texts: np.ndarray, group_size: int) -> list[np.ndarray]:
    """A group's texts cut into len // group_size near-equal pieces (one piece when fewer), so
    every piece but a small group's only one holds group_size to 2 x group_size - 1 texts: never
    a lone text, which would have no positive in its batch."""
    return np.array_split(texts, max(1, len(texts) // group_size))


def _neighbour_runs(order: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """`order` rearranged into runs (`_neighbour_run_list`), laid end to end."""
    return np.array([g for run in _neighbour_run_list(order, neighbours) for g in run], dtype=np.int64)


def _neighbour_run_list(order: np.ndarray, neighbours: np.ndarray) -> list[list[int]]:
    """`order` cut into runs: each run starts at the next unused group and follows each group's
    nearest unused neighbour, for up to NEIGHBOUR_RUN groups."""
    used = np.zeros(len(order), dtype=bool)
    out = []
    for start in order.tolist():
        cur, run = start, []
        while cur is not None and not used[cur] and len(run) < NEIGHBOUR_RUN:
            used[cur] = True
            run.append(cur)
            cur = next((int(n) for n in neighbours[cur] if n >= 0 and not used[n]), None)
        if run:
            out.append(run)
    return out


def _other_member(pool: np.ndarray, anchor: int, rng: np.random.Generator) -> int:
    """A uniformly random member of the group other than the anchor."""
    j = int(rng.integers(len(pool) - 1))
    pos = int(np.searchsorted(pool, anchor))
    return int(pool[j + 1] if j >= pos else pool[j])
