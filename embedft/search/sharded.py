"""`index build` of a corpus larger than memory: streamed through on-disk shards, resumable, shared by ranks.

The corpus is read in chunks of `chunk_rows` rows (`corpus.iter_corpus`); chunk k is shard k. Its work
lives in a folder beside --out, `.<out>.build/`, until the index folder is saved:

    plan.json                  what the shards are of (the corpus file's size and mtime, the columns, the
                               chunk size, the model's weights digest) and how many rows each holds
    ids-00000.json             shard 0's ids (and labels-00000.json, its labels), from the first pass
    vec-00000.npy              shard 0's vectors, float32 (rows, dim); there = the shard is embedded
    index-<factory>/           trained.faiss and part-00000.faiss: an IVF index filled by several ranks

A build runs in four steps, each written whole (`atomic`), so a killed build run again continues from
its last finished file:

1. plan (rank 0): one pass over the corpus checks every row as `read_corpus` does (the same messages
   and row numbers; duplicate ids across chunks by `IdCheck`) and writes each shard's ids. A plan
   already there for the same corpus file, columns, chunk size and model is resumed; another is
   removed and the build starts afresh.
2. embed (every rank): rank r embeds the shards k with k % world_size == r that have no vectors yet.
3. train (rank 0): an index that needs training (IVF, PQ) trains on `index.train_rows` of the vectors,
   read from the memory-mapped shards: all of them up to 256 per centroid, else a seeded sample,
   the same rows `index build` of the corpus in memory trains on.
4. add: rank 0 adds the shards in order. An IVF index under several ranks: each rank fills one part
   per shard of its own (`index.index_part`), and rank 0 merges them in order (the same index).

Then rank 0 saves the index folder (ids and labels streamed from the shards) and removes the work
folder. Rank 0 holds `.<out>.build.lock` from the plan to the end (`atomic.holding`): a second build of
the same --out meanwhile is refused, as it would embed the same shards again or remove them. Peak
memory is the index itself, one chunk, and while training the training sample; the disk holds every
vector once more (4 x dim bytes a row) until the build ends.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from embedft import distributed
from embedft.atomic import write_bytes, write_chunks, write_text
from embedft.errors import SearchError
from embedft.search.corpus import IdCheck, iter_corpus

log = logging.getLogger(__name__)

# Rows a chunk (a shard) holds by default, and the most rows a corpus is read whole with: a chunk's
# texts, tokens and vectors are what a build holds in memory besides the index.
CHUNK_ROWS = 100_000
PLAN_FILE = "plan.json"
WORK_FIX = "free space there, or build the index elsewhere (--out)"


def work_dir(out: Path) -> Path:
    """The folder of an unfinished build of the index folder `out` (removed when the build ends)."""
    return out.parent / f".{out.name}.build"


def work_lock(out: Path) -> Path:
    """What a streamed build of `out` holds while it runs (`atomic.holding`), beside the work folder, which
    a build of another corpus removes and makes again: a second build of `out` meanwhile is refused."""
    return out.parent / f".{out.name}.build.lock"


@dataclass(frozen=True)
class Plan:
    """What a streamed build's shards hold: `key` (what they depend on), each shard's rows, the id column."""

    key: dict
    rows: list[int]  # rows of each shard, in order
    id_column: str | None  # the column the ids came from; None: the file's row numbers
    labels: bool

    @property
    def count(self) -> int:
        return sum(self.rows)

    @property
    def starts(self) -> list[int]:
        """The first row of each shard."""
        return np.concatenate([[0], np.cumsum(self.rows)[:-1]]).astype(int).tolist() if self.rows else []


def plan_key(corpus: Path, text_column: str, id_column: str | None, header: bool, label_column: str | None,
             chunk_rows: int, model: str) -> dict:
    """What the shards of a build depend on: the same key, the same shards (a resumed build needs it)."""
    st = corpus.stat()
    return {"corpus": str(corpus.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "text_column": text_column, "id_column": id_column, "header": header, "label_column": label_column,
            "chunk_rows": chunk_rows, "model": model}


class ShardedBuild:
    """The work folder of one streamed `index build` (see the module's docstring); every rank holds one."""

    def __init__(self, out: Path):
        self.dir = work_dir(out)

    def _file(self, kind: str, k: int, ext: str) -> Path:
        return self.dir / f"{kind}-{k:05d}.{ext}"

    # 1. plan ------------------------------------------------------------------------------------------

    def plan(self, key: dict, label_column: str | None) -> Plan:
        """The plan of this build: read from a resumable work folder, else made by one pass over the corpus
        (rank 0), then shared with every rank."""
        plan = None
        if distributed.current().is_main:
            plan = self._resumable(key) or self._make_plan(key, label_column)
        return distributed.broadcast_object(plan)

    def _resumable(self, key: dict) -> Plan | None:
        path = self.dir / PLAN_FILE
        if not path.is_file():
            if self.dir.exists():  # a build killed in its first pass
                shutil.rmtree(self.dir)
            return None
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["key"] != key:
            changed = sorted(k for k in key if saved["key"].get(k) != key[k])
            log.warning("%s: an unfinished build of another corpus, model or chunk size is there (it differs in: %s); "
                        "starting afresh", self.dir, ", ".join(changed))
            shutil.rmtree(self.dir)
            return None
        plan = Plan(saved["key"], saved["rows"], saved["id_column"], saved["labels"])
        done = sum(self._file("vec", k, "npy").is_file() for k in range(len(plan.rows)))
        log.warning("%s: resuming an unfinished build: %d of %d shards embedded (remove the folder to start afresh)",
                    self.dir, done, len(plan.rows))
        return plan

    def _make_plan(self, key: dict, label_column: str | None) -> Plan:
        corpus = Path(key["corpus"])
        self.dir.mkdir(parents=True)
        try:
            rows, id_column = [], None
            ids = IdCheck(corpus, key["id_column"])
            for k, chunk in enumerate(iter_corpus(corpus, key["text_column"], key["id_column"], key["header"],
                                                  label_column, key["chunk_rows"])):
                ids.add(chunk.ids)
                id_column = chunk.id_column
                rows.append(len(chunk.ids))
                write_text(self._file("ids", k, "json"), json.dumps(chunk.ids), WORK_FIX)
                if chunk.labels is not None:
                    write_text(self._file("labels", k, "json"), json.dumps(chunk.labels), WORK_FIX)
            ids.check(lambda: self._lists("ids", len(rows)))
            plan = Plan(key, rows, id_column, label_column is not None)
            write_text(self.dir / PLAN_FILE, json.dumps({"key": key, "rows": rows, "id_column": id_column,
                                                         "labels": plan.labels}, indent=1), WORK_FIX)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)  # nothing worth resuming: the corpus was not embedded
            raise
        return plan

    def _lists(self, kind: str, shards: int) -> Iterator[list]:
        for k in range(shards):
            yield json.loads(self._file(kind, k, "json").read_text(encoding="utf-8"))

    # 2. embed -----------------------------------------------------------------------------------------

    def embed(self, plan: Plan, embed: Callable[[Sequence[str]], np.ndarray], progress: bool = False) -> None:
        """Embed this rank's shards that have no vectors yet (`embed`: texts -> (n, dim) float32), then wait
        for the other ranks."""
        from tqdm.auto import tqdm

        d = distributed.current()
        todo = {k for k in range(d.rank, len(plan.rows), d.world_size) if not self._file("vec", k, "npy").is_file()}
        if todo:
            self._check_unchanged(plan)
            key = plan.key
            chunks = iter_corpus(key["corpus"], key["text_column"], key["id_column"], key["header"], None,
                                 key["chunk_rows"])
            with tqdm(total=sum(plan.rows[k] for k in todo), desc="embed", unit="text", leave=False,
                      disable=not (progress and d.is_main)) as bar:
                for k, chunk in enumerate(chunks):
                    if k > max(todo):
                        break
                    if k not in todo:
                        continue
                    if len(chunk.texts) != plan.rows[k]:
                        raise SearchError(f"{key['corpus']}: shard {k} has {len(chunk.texts)} rows, not the "
                                          f"{plan.rows[k]} the build's plan found; remove {self.dir} and build again")
                    self._save_vectors(k, embed(chunk.texts))
                    bar.update(len(chunk.texts))
                    log.debug("rank %d: shard %d embedded (%d rows)", d.rank, k, len(chunk.texts))
        distributed.barrier()

    def _check_unchanged(self, plan: Plan) -> None:
        st = Path(plan.key["corpus"]).stat()
        if (st.st_size, st.st_mtime_ns) != (plan.key["size"], plan.key["mtime_ns"]):
            raise SearchError(f"{plan.key['corpus']} changed while its index was built; build again")

    def _save_vectors(self, k: int, vectors: np.ndarray) -> None:
        # An .npy file written from the array's own buffer (no second copy of a large shard).
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(vectors))
        write_chunks(self._file("vec", k, "npy"), [header.getvalue(), memoryview(vectors).cast("B")], WORK_FIX)

    def vectors(self, k: int) -> np.ndarray:
        """Shard k's vectors, memory-mapped: (rows, dim) float32."""
        return np.load(self._file("vec", k, "npy"), mmap_mode="r")

    # 3, 4. train and add ------------------------------------------------------------------------------

    def build_index(self, plan: Plan, dim: int, factory: str, **knobs: Any):
        """The index of every shard's vectors, on rank 0 (None on the others, which fill their IVF parts)."""
        from embedft.evaluation.index import build_index_in_parts, mergeable, new_index, train_rows, train_size

        d = distributed.current()
        probe = new_index(dim, factory, plan.count)
        m = train_size(probe, plan.count)
        if d.enabled and mergeable(probe):
            return self._build_in_parts(plan, dim, factory, m, **knobs)
        if not d.is_main:
            return None
        train = self._gather(plan, train_rows(plan.count, m)) if m else None
        try:
            return build_index_in_parts(dim, factory, plan.count, train,
                                        (self.vectors(k) for k in range(len(plan.rows))), **knobs)
        except ValueError as e:  # training can still fail (a PQ with too few vectors per code)
            raise SearchError(f"--index {factory}: {e}") from e

    def _gather(self, plan: Plan, rows: np.ndarray) -> np.ndarray:
        # The vectors of the given rows (sorted), read shard by shard from the memory-mapped files.
        parts = []
        for k, (start, n) in enumerate(zip(plan.starts, plan.rows)):
            mine = rows[(rows >= start) & (rows < start + n)] - start
            if len(mine):
                parts.append(np.asarray(self.vectors(k)[mine]))
        return np.concatenate(parts)

    def _build_in_parts(self, plan: Plan, dim: int, factory: str, m: int, **knobs: Any):
        # An IVF index under several ranks: rank 0 trains, each rank fills its shards' parts, rank 0 merges.
        import faiss

        from embedft.evaluation.index import index_part, merge_parts, train_rows, trained_index

        d = distributed.current()
        folder = self.dir / f"index-{hashlib.sha256(factory.encode()).hexdigest()[:8]}"
        trained_file = folder / "trained.faiss"
        if d.is_main and not trained_file.is_file():
            try:
                index = trained_index(dim, factory, plan.count, self._gather(plan, train_rows(plan.count, m)))
            except ValueError as e:
                raise SearchError(f"--index {factory}: {e}") from e
            write_bytes(trained_file, faiss.serialize_index(index).tobytes(), WORK_FIX)
        distributed.barrier()
        trained = faiss.read_index(str(trained_file))
        for k in range(d.rank, len(plan.rows), d.world_size):
            part = folder / f"part-{k:05d}.faiss"
            if not part.is_file():
                filled = index_part(trained, self.vectors(k), plan.starts[k])
                write_bytes(part, faiss.serialize_index(filled).tobytes(), WORK_FIX)
        distributed.barrier()
        if not d.is_main:
            return None
        parts = (faiss.read_index(str(folder / f"part-{k:05d}.faiss")) for k in range(len(plan.rows)))
        return merge_parts(trained, parts, plan.count, **knobs)

    # 5. save ------------------------------------------------------------------------------------------

    def ids(self, plan: Plan):
        """Every shard's ids, in order, read part by part (`index.ListParts`)."""
        from embedft.evaluation.index import ListParts

        return ListParts(plan.count, lambda: self._lists("ids", len(plan.rows)))

    def labels(self, plan: Plan):
        """Every shard's labels like `ids`; None for a build without labels."""
        from embedft.evaluation.index import ListParts

        return ListParts(plan.count, lambda: self._lists("labels", len(plan.rows))) if plan.labels else None

    def remove(self) -> None:
        """Remove the work folder: the index folder is saved."""
        shutil.rmtree(self.dir, ignore_errors=True)


def chunk_rows_for(corpus: Path, chunk_rows: int | None, world_size: int) -> int:
    """The chunk size of a build: `chunk_rows` when given (0: the corpus is read whole, in one process);
    by default the corpus is read whole up to CHUNK_ROWS rows (`corpus_rows`), else in chunks of
    CHUNK_ROWS, and under torchrun always in chunks, small enough that every rank gets one."""
    from embedft.search.corpus import corpus_rows

    if chunk_rows == 0 and world_size > 1:
        raise SearchError(f"--chunk-rows 0 reads the corpus whole in one process, but {world_size} processes run "
                          "(torchrun); leave --chunk-rows out, or run without torchrun")
    if chunk_rows is not None:
        return chunk_rows
    bound = corpus_rows(corpus)
    if world_size > 1:
        return max(1, min(CHUNK_ROWS, -(-(bound or CHUNK_ROWS) // world_size)))
    return CHUNK_ROWS if bound is not None and bound > CHUNK_ROWS else 0

