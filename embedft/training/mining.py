"""Hard negatives and neighbouring groups, found with the current encoder by exact search.

`mine_hard_negatives` returns each anchor text's nearest texts of another key, minus the
candidates that score too close to the anchor's positive (likely unlabelled positives: NV-Retriever's
positive-aware filter, with sentence-transformers' `relative_margin` / `absolute_margin` names).
`Miner` is what the training loop holds: it mines at the start, refreshes on `loss.mine_every`,
attaches the negatives to each batch (pairs and group batches alike) and keeps them in the
checkpoint, so a resumed run trains on the very negatives the uninterrupted one did.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from embedft.config import LossConfig
from embedft.data.batches import Batch, PairSource, group_keys
from embedft.modeling.encoder import Encoder
from embedft.training.tokens import TokenCache

log = logging.getLogger(__name__)


def positive_scores(q: np.ndarray, docs: np.ndarray, src: PairSource) -> np.ndarray:
    """(T,) per anchor text, its best score against any of its positives (-inf for texts that are
    no anchor); q (T, D) query vectors and docs (T, D) document vectors by text id."""
    best = np.full(len(docs), -np.inf, dtype=np.float32)
    if src.positives is not None:  # pairs: the row's positive; a query of several rows keeps its best
        s = np.einsum("nd,nd->n", q[src.anchors], docs[src.positives])
        np.maximum.at(best, src.anchors, s.astype(np.float32))
        return best
    for members in src.members.values():  # grouped/labeled: every other member of the group is a positive
        if len(members) < 2:
            continue
        s = q[members] @ docs[members].T  # (n_k, n_k)
        np.fill_diagonal(s, -np.inf)
        best[members] = np.maximum(best[members], s.max(axis=1))
    return best


# The default search scores a chunk of anchors against the whole pool at once: at most this many scores.
SCORES_AT_ONCE = 1 << 25


def nearest_of_other_keys(pool_vecs: np.ndarray, queries: np.ndarray, pool: np.ndarray, anchors: np.ndarray,
                          keys: np.ndarray, k: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of each anchor over the pool texts that share no key with it and are not it:
    (A, k) scores and positions into `pool`, nearest first, -inf / -1 where fewer exist. pool_vecs (P, D),
    queries (A, D) the anchors' vectors, keys (T, W) every key of each text, -1 padded. However many texts of
    its own label have gathered around an anchor, its k nearest texts of other labels are found."""
    from embedft.training.losses import false_negative_mask

    dev = device if device.type == "cuda" else torch.device("cpu")
    k = min(k, len(pool))
    scores = np.full((len(anchors), k), -np.inf, dtype=np.float32)
    ranked = np.full((len(anchors), k), -1, dtype=np.int64)
    if k == 0:
        return scores, ranked
    corpus = torch.from_numpy(np.ascontiguousarray(pool_vecs, dtype=np.float32)).to(dev)
    pool_keys, pool_ids = torch.from_numpy(keys[pool]).to(dev), torch.from_numpy(pool).to(dev)
    rows = max(1, SCORES_AT_ONCE // len(pool))
    for lo in range(0, len(anchors), rows):
        a = anchors[lo:lo + rows]
        sim = torch.from_numpy(np.ascontiguousarray(queries[lo:lo + rows], dtype=np.float32)).to(dev) @ corpus.T
        sim.masked_fill_(false_negative_mask(torch.from_numpy(keys[a]).to(dev), pool_keys,
                                             torch.from_numpy(a).to(dev), pool_ids), float("-inf"))
        top = torch.topk(sim, k, dim=1)
        s, i = top.values.cpu().numpy(), top.indices.cpu().numpy()
        i[~np.isfinite(s)] = -1
        scores[lo:lo + rows], ranked[lo:lo + rows] = s, i
    return scores, ranked


def _candidate_pool(src: PairSource) -> np.ndarray:
    """Text ids a negative may be: documents for pairs (positives and given negatives), any text otherwise."""
    if src.positives is None:
        return np.arange(len(src.texts))
    docs = src.positives if src.negatives is None else np.concatenate([src.positives, src.negatives.reshape(-1)])
    return np.unique(docs[docs >= 0])


class StepVectors:
    """The vectors the training steps computed since the last mining, by text id (`loss.mine_from_steps`):
    what a refresh searches instead of encoding every training text again. Kept as float16, in the
    checkpoint too, so a resumed run mines from the very vectors the uninterrupted one did."""

    def __init__(self, n_texts: int, dim: int, two_forms: bool):
        self.docs = np.zeros((n_texts, dim), dtype=np.float16)
        self.doc_known = np.zeros(n_texts, dtype=bool)
        # Without a query instruction a query vector is its document vector: one table serves both.
        self.queries = np.zeros_like(self.docs) if two_forms else self.docs
        self.query_known = np.zeros(n_texts, dtype=bool) if two_forms else self.doc_known

    def record(self, gather: dict, emb: torch.Tensor) -> None:
        """Keep a step's rows (`tokens.batch_sequences`' gather; emb (N, D) the step's embeddings)."""
        e = emb.detach().float().cpu().numpy().astype(np.float16)
        n, q_ids = gather["n_q"], gather["q_ids"]
        self._put(self.queries, self.query_known, q_ids, e[:n])
        if "d_ids" in gather:  # pairs: query rows, then the document rows
            self._put(self.docs, self.doc_known, gather["d_ids"], e[n:n + len(gather["d_ids"])])
            return
        if gather["two_forms"]:  # group batches: every text as a query, then as a document
            self._put(self.docs, self.doc_known, q_ids, e[n:2 * n])
        if "neg_ids" in gather:  # then the mined negatives (document form)
            start = gather["neg_start"]
            self._put(self.docs, self.doc_known, gather["neg_ids"], e[start:start + len(gather["neg_ids"])])

    @staticmethod
    def _put(table: np.ndarray, known: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> None:
        table[ids] = rows
        known[ids] = True

    def forget(self) -> None:
        """After a mining: the next one uses only what the steps compute from now on."""
        self.doc_known[:] = False
        self.query_known[:] = False

    def state(self) -> dict[str, np.ndarray]:
        out = {"seen_docs": self.docs, "seen_doc_known": self.doc_known}
        if self.queries is not self.docs:
            out.update({"seen_queries": self.queries, "seen_query_known": self.query_known})
        return out

    def load(self, saved: dict[str, np.ndarray]) -> None:
        if "seen_docs" not in saved:  # a checkpoint of a run without them: the next refresh encodes all
            return
        self.docs[:], self.doc_known[:] = saved["seen_docs"], saved["seen_doc_known"]
        if "seen_queries" in saved and self.queries is not self.docs:
            self.queries[:], self.query_known[:] = saved["seen_queries"], saved["seen_query_known"]


def _vectors(ids: np.ndarray, encode, seen: StepVectors | None, query: bool) -> tuple[np.ndarray, int]:
    """(len(ids), D) vectors of texts ids in one form: `seen`'s rows where a step embedded them, the others
    encoded now; and how many were encoded."""
    if seen is None:
        return encode(ids), len(ids)
    table, known = (seen.queries, seen.query_known) if query else (seen.docs, seen.doc_known)
    have = known[ids]
    out = table[ids].astype(np.float32)
    if not have.all():
        out[~have] = encode(ids[~have])
    return out, int((~have).sum())


@torch.no_grad()
def mine_hard_negatives(encoder: Encoder, src: PairSource, cache: TokenCache, n: int, device: torch.device, *,
                        range_min: int = 0, relative_margin: float | None = None,
                        absolute_margin: float | None = None, seen: StepVectors | None = None,
                        range_max: int | None = None) -> np.ndarray:
    """(T, n) per text id: the anchor text's n nearest candidates of another key, nearest first,
    -1 padded (rows of texts that are no anchor stay -1), by the current encoder.

    The `range_max` nearest candidates are searched, and the `range_min` nearest eligible ones skipped. null: the
    range_min + 10 n + 32 nearest candidates of another key, by an exact search that leaves the anchor's own
    group's or label's texts out (`nearest_of_other_keys`), so an anchor whose label has gathered around it still
    reaches texts of other keys. A candidate scoring above the anchor's
    positive score p minus |p| * relative_margin, or above p - absolute_margin, is dropped as a
    likely false negative (sentence-transformers' `mine_hard_negatives` semantics; relative_margin
    0.05 is NV-Retriever's "95% of the positive's score"). With `seen`, the texts the training steps
    embedded since the last mining keep those vectors and only the others are encoded.
    """
    from embedft.evaluation.index import exact_search

    anchors = np.unique(src.anchors)
    all_ids = np.arange(len(src.texts))
    docs, n_enc = _vectors(all_ids, lambda ids: encoder.encode_ids(cache.docs(ids), device=device), seen,
                           query=False)  # (T, D)
    n_wanted = len(all_ids)
    if cache.two_forms:
        q = np.zeros_like(docs)
        q[anchors], n_q = _vectors(anchors, lambda ids: encoder.encode_ids(cache.queries(ids), device=device), seen,
                                   query=True)
        n_enc, n_wanted = n_enc + n_q, n_wanted + len(anchors)
    else:  # no query instruction: an anchor's query vector is its doc vector
        q = docs
    if seen is not None:
        log.info("mining: %d texts' vectors from the training steps, %d encoded", n_wanted - n_enc, n_enc)
    pos = positive_scores(q, docs, src)  # (T,)
    pool = _candidate_pool(src)
    keys = src.keys  # (T, W) every key of each text: a title of two products is a positive of both
    # By default as sentence-transformers sizes its range when margins filter: room for ~10x the wanted negatives,
    # counted among the texts of other keys. An explicit range_max counts texts of any key, as sentence-transformers.
    if range_max is None:
        scores, ranked = nearest_of_other_keys(docs[pool], q[anchors], pool, anchors, keys, range_min + 10 * n + 32,
                                               device)
    else:
        scores, ranked = exact_search(docs[pool], q[anchors], min(len(pool), range_max))  # (A, depth) into pool
    out = np.full((len(src.texts), n), -1, dtype=np.int64)
    n_margin = n_short = 0
    for row, a in enumerate(anchors.tolist()):
        ok = ranked[row] >= 0
        cand, s = pool[ranked[row][ok]], scores[row][ok]
        if range_max is not None:  # a search of any key: keep the texts sharing no key with the anchor's text
            own = keys[a][keys[a] >= 0]
            eligible = ~np.isin(keys[cand], own).any(axis=1) & (cand != a)
            cand, s = cand[eligible], s[eligible]
        cand, s = cand[range_min:], s[range_min:]
        keep = np.ones(len(cand), dtype=bool)
        if np.isfinite(pos[a]):
            if relative_margin is not None:
                keep &= s <= pos[a] - abs(pos[a]) * relative_margin
            if absolute_margin is not None:
                keep &= s + absolute_margin <= pos[a]
        n_margin += int((~keep).sum())
        cand = cand[keep][:n]
        out[a, : len(cand)] = cand
        n_short += len(cand) < n
    if n_margin:
        log.info("mining: %d candidates dropped as likely false negatives (scoring within the margin of the "
                 "anchor's positive: loss.mine_relative_margin / loss.mine_absolute_margin)", n_margin)
    if n_short:
        log.warning("mining: %d of %d anchors got fewer than %d negatives (padded); raise loss.mine_range_max, lower "
                    "loss.mine_range_min or the margins, or loss.hard_negatives", n_short, len(anchors), n)
    return out


@torch.no_grad()
def group_neighbours(encoder: Encoder, src: PairSource, cache: TokenCache, device: torch.device,
                     m: int = 16) -> np.ndarray:
    """(n_groups, m) each training group's nearest other groups (positions into the sorted group
    keys, nearest first, -1 padded) by the cosine of their mean document embeddings."""
    from embedft.evaluation.index import exact_search

    keys = group_keys(src)  # the order group_batches indexes neighbours by
    texts = np.concatenate([src.members[int(k)] for k in keys.tolist()])
    owner = np.repeat(np.arange(len(keys)), [len(src.members[int(k)]) for k in keys.tolist()])
    emb = encoder.encode_ids(cache.docs(texts), device=device)  # (T, D)
    cent = np.zeros((len(keys), emb.shape[1]), dtype=np.float32)
    np.add.at(cent, owner, emb)
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    out = np.full((len(keys), m), -1, dtype=np.int64)
    depth = min(len(keys) - 1, m)
    if depth >= 1:
        _, ranked = exact_search(cent, cent, depth, self_ids=np.arange(len(keys)))
        out[:, :depth] = ranked
    return out


def attach_negatives(batch: Batch, mined: np.ndarray, n: int) -> Batch:
    """The batch with each anchor's first n mined negatives ((B, n) text ids, -1 padded)."""
    return dataclasses.replace(batch, negatives=mined[batch.anchors, :n])


def mining_due(mine_every: int | str | None, step: int, epoch_start: bool) -> bool:
    """Whether `loss.mine_every` asks for fresh negatives now: after every N-th step, or at an epoch's start."""
    if mine_every == "epoch":
        return epoch_start
    return isinstance(mine_every, int) and not epoch_start and step > 0 and step % mine_every == 0


class Miner:
    """Mined negatives (and similar_groups' neighbours) over a run: mined at the start, refreshed on
    `loss.mine_every` with the encoder as it is then, checkpointed with the run.

    Refreshes happen at fixed steps, and what was mined last is saved in every checkpoint, so a
    resumed run uses (and later re-mines at the same steps) exactly what the uninterrupted run did.
    """

    def __init__(self, encoder: Encoder, src: PairSource, cache: TokenCache, loss_cfg: LossConfig,
                 batch_sampling: str, device: torch.device):
        self.encoder, self.src, self.cache, self.cfg, self.device = encoder, src, cache, loss_cfg, device
        self.mines_negatives = loss_cfg.hard_negatives > 0 and src.negatives is None
        self.mines_neighbours = batch_sampling == "similar_groups"
        self.negatives: np.ndarray | None = None  # (T, H) by text id
        self.neighbours: np.ndarray | None = None  # (n_groups, m)
        self.mined_at: int | None = None  # the step whose weights mined them
        self.seen = StepVectors(len(src.texts), encoder.spec.hidden_size, cache.two_forms) \
            if loss_cfg.mine_from_steps and self.mines_negatives else None

    def start(self, saved: dict[str, np.ndarray] | None = None) -> None:
        """Take what a resumed run's checkpoint holds (`state()`), else mine with the encoder as it is
        (the starting one)."""
        if saved is not None and "mined_at" in saved:
            self.negatives, self.neighbours = saved.get("negatives"), saved.get("neighbours")
            self.mined_at = int(saved["mined_at"])
            if self.seen is not None:
                self.seen.load(saved)
            return
        self._refresh(0, self.mines_negatives, self.mines_neighbours, "the starting encoder")

    def _refresh(self, step: int, negatives: bool, neighbours: bool, what: str = "the current encoder") -> None:
        # The RNG is left as it was, so the batches (and dropout) stay those of a run without refreshes.
        if not (negatives or neighbours):
            return
        state = torch.get_rng_state()
        if negatives:
            log.info("step %d: mining %d hard negatives per anchor with %s", step, self.cfg.hard_negatives, what)
            t0 = time.perf_counter()
            cfg = self.cfg
            self.negatives = mine_hard_negatives(self.encoder, self.src, self.cache, cfg.hard_negatives, self.device,
                                                 range_min=cfg.mine_range_min, range_max=cfg.mine_range_max,
                                                 relative_margin=cfg.mine_relative_margin,
                                                 absolute_margin=cfg.mine_absolute_margin, seen=self.seen)
            if self.seen is not None:
                self.seen.forget()
            log.info("mining: %.1f s", time.perf_counter() - t0)
        if neighbours:
            log.info("step %d: finding each group's nearest groups with %s", step, what)
            self.neighbours = group_neighbours(self.encoder, self.src, self.cache, self.device)
        torch.set_rng_state(state)
        self.mined_at = step

    def at_epoch_start(self, step: int, mid_epoch_resume: bool = False) -> None:
        """With `loss.mine_every` set, similar_groups' neighbours are found again at each epoch's start
        (where an epoch lays out its groups), and with `mine_every: epoch` the negatives too. Not when
        a run resumes inside the epoch: its checkpoint holds what that epoch used."""
        if self.cfg.mine_every is None or step == 0 or mid_epoch_resume:
            return
        self._refresh(step, self.mines_negatives and mining_due(self.cfg.mine_every, step, True),
                      self.mines_neighbours)

    def after_step(self, step: int, n_total: int) -> None:
        """With `loss.mine_every: N`, the negatives are mined again after every N-th step (not after the last)."""
        if step < n_total and mining_due(self.cfg.mine_every, step, False):
            self._refresh(step, self.mines_negatives, False)

    def record(self, gather: dict, emb: torch.Tensor) -> None:
        """Under `loss.mine_from_steps`, keep a step's vectors for the next refresh (`StepVectors.record`)."""
        if self.seen is not None:
            self.seen.record(gather, emb)

    def attach(self, batch: Batch) -> Batch:
        """The batch with its anchors' mined negatives (unchanged when nothing is mined)."""
        return batch if self.negatives is None else attach_negatives(batch, self.negatives, self.cfg.hard_negatives)

    def state(self) -> dict[str, np.ndarray]:
        """What a checkpoint keeps (`checkpoint.save_checkpoint(arrays=...)`): the arrays in use and the
        step whose weights mined the latest of them."""
        if self.mined_at is None:
            return {}
        out = {"mined_at": np.int64(self.mined_at)}
        if self.negatives is not None:
            out["negatives"] = self.negatives
        if self.neighbours is not None:
            out["neighbours"] = self.neighbours
        if self.seen is not None:
            out.update(self.seen.state())
        return out
