"""Index folders for a search team: build one from a corpus with an export, then query it.

`embedft index build` embeds a corpus with an export (plain sentence-transformers) and saves a
FAISS index folder whose manifest names that export; `embedft index search` opens the folder,
embeds the queries with the same export (checked by its weights' identity), searches, and can
classify each query by its neighbours' labels.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from embedft.atomic import holding, out_dir_problem, write_text
from embedft.errors import SearchError
from embedft.export.fingerprint import weights_digest, weights_stat
from embedft.search.corpus import corpus_file, read_corpus

log = logging.getLogger(__name__)


# Rows of the longest text that one forward call's padded tokens may hold (`chunking.forward_chunks`).
ENCODE_BATCH_SIZE = 128


def _require_export(model_dir: Path) -> None:
    if not (model_dir / "modules.json").is_file():
        raise SearchError(f"{model_dir} is not a sentence-transformers folder (no modules.json); "
                          f"pass an `embedft export` folder")


def _dimension(st) -> int:
    return (getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension)()  # renamed in ST 6


def encode(st, texts: Sequence[str], prompt_name: str | None = None, batch_size: int = ENCODE_BATCH_SIZE,
           progress: bool = False) -> np.ndarray:
    """(N, D) normalised float32 embeddings, as `st.encode(texts, prompt_name=...)` gives them, faster.

    Repeated texts are embedded once, and each forward call gets a batch cut from the
    length-sorted texts where padding plus per-call overhead is least (`chunking.forward_chunks`,
    as embedft's own encoder does) instead of every `batch_size` texts. Each batch still goes
    through `st.encode`, so prompts, pooling and normalisation are exactly the served model's.
    `progress`: a bar of texts embedded, on stderr.
    """
    from tqdm.auto import tqdm

    from embedft.modeling import chunking

    dim = _dimension(st)
    if not texts:
        return np.empty((0, dim), dtype=np.float32)
    unique, inverse = chunking.distinct(texts)
    prompt = st.prompts.get(prompt_name, "") if prompt_name else ""
    lengths = [len(x) for x in st.tokenizer([prompt + t for t in unique], truncation=True,
                                             max_length=st.max_seq_length)["input_ids"]]
    out = np.empty((len(unique), dim), dtype=np.float32)
    chunks = chunking.forward_chunks(lengths, batch_size, st.device)
    with tqdm(total=len(unique), desc="embed", unit="text", leave=False, disable=not progress) as bar:
        for idx in chunks:
            out[idx] = st.encode([unique[i] for i in idx], prompt_name=prompt_name, batch_size=len(idx),
                                 normalize_embeddings=True, convert_to_numpy=True)
            bar.update(len(idx))
    return out[inverse]


def index_corpus(model_dir: str | Path, corpus: str | Path, out_dir: str | Path, factory: str = "Flat",
                 text_column: str = "text", id_column: str | None = "id", header: bool = True,
                 label_column: str | None = None, overwrite: bool = False, batch_size: int = ENCODE_BATCH_SIZE,
                 device: str = "auto", progress: bool = False, chunk_rows: int | None = None) -> dict:
    """Embed a corpus with an export (plain sentence-transformers) and save a FAISS index; returns the manifest.

    With `label_column` the index keeps each row's label, for `classify`. `device`: auto (CUDA
    when there is one), cpu, cuda or cuda:N. `chunk_rows`: a corpus of more rows is streamed that
    many rows at a time through on-disk shards, resumable (`sharded`); 0 reads any corpus whole;
    None (the default) streams one of more than `sharded.CHUNK_ROWS` rows. Under torchrun the
    processes share the shards (cuda: one GPU each) and rank 0 saves the folder; every rank
    returns the manifest.
    """
    from embedft import distributed
    from embedft.modeling.runtime import resolve_device
    from embedft.search.sharded import chunk_rows_for

    # A bad --device fails before anything is read; under torchrun the process group is joined (left to
    # the caller to end) and each rank takes its own GPU.
    dev, dist = distributed.place(resolve_device(device, "--device"))
    d, out = Path(model_dir), Path(out_dir)
    _require_export(d)
    problem = out_dir_problem(out, overwrite) if dist.is_main else None
    if problem:
        raise SearchError(f"index folder: {problem}")
    corpus_file(corpus, header)  # a missing or unreadable file is named before a chunk size is chosen
    chunk = chunk_rows_for(Path(corpus), chunk_rows, dist.world_size)
    source = dict(model_dir=d, corpus=Path(corpus), out=out, factory=factory, text_column=text_column,
                  id_column=id_column, header=header, label_column=label_column, overwrite=overwrite)
    embed_options = dict(batch_size=batch_size, device=str(dev), progress=progress)
    if chunk:
        return _index_streamed(**source, chunk_rows=chunk, **embed_options)
    return _index_in_memory(**source, **embed_options)


def _index_in_memory(model_dir: Path, corpus: Path, out: Path, factory: str, text_column: str, id_column: str | None,
                     header: bool, label_column: str | None, overwrite: bool, batch_size: int, device: str,
                     progress: bool) -> dict:
    # The corpus read whole, embedded at once, indexed in memory.
    from sentence_transformers import SentenceTransformer

    from embedft.evaluation.index import build_index, new_index, train_rows, train_size

    rows = read_corpus(corpus, text_column, id_column, header, label_column)
    # The identity of the weights the model is loaded from, taken before loading (stat first:
    # a file changed while it is hashed then fails the quick check of `index search`).
    files = weights_stat(model_dir)
    digest = weights_digest(model_dir)
    model = SentenceTransformer(str(model_dir), device=device)
    n = len(rows.texts)
    try:
        m = train_size(new_index(_dimension(model), factory, n), n)  # a bad --index fails now, not after the corpus is embedded
    except ValueError as e:
        raise SearchError(f"--index {factory}: {e}") from e
    vectors = encode(model, rows.texts, batch_size=batch_size, progress=progress)
    try:  # trained on the rows a streamed build of the corpus trains on (`sharded`): the same index
        index = build_index(vectors, factory, train=vectors[train_rows(n, m)] if 0 < m < n else None)
    except ValueError as e:  # training can still fail (a PQ with too few vectors per code)
        raise SearchError(f"--index {factory}: {e}") from e
    manifest = _manifest(digest, index, factory, files, model_dir, corpus, text_column, rows.id_column, header,
                         label_column)
    _save(out, index, rows.ids, manifest, rows.labels, overwrite)
    return manifest


def _index_streamed(model_dir: Path, corpus: Path, out: Path, factory: str, text_column: str, id_column: str | None,
                    header: bool, label_column: str | None, overwrite: bool, batch_size: int, device: str,
                    progress: bool, chunk_rows: int) -> dict:
    # The corpus streamed through on-disk shards, shared by torchrun's ranks (`sharded`); rank 0 saves.
    from sentence_transformers import SentenceTransformer

    from embedft import distributed
    from embedft.evaluation.index import new_index
    from embedft.search.sharded import ShardedBuild, plan_key, work_lock

    main = distributed.current().is_main
    files = weights_stat(model_dir) if main else None
    digest = distributed.broadcast_object(weights_digest(model_dir) if main else None)
    # Rank 0 holds the build from its plan to its end: a second build of this --out is refused (its ranks stop too).
    with holding(out, "embedft index build", "build into another --out", work_lock(out)) if main else nullcontext():
        build = ShardedBuild(out)
        plan = build.plan(plan_key(corpus, text_column, id_column, header, label_column, chunk_rows, digest),
                          label_column)
        model = SentenceTransformer(str(model_dir), device=device)
        dim = _dimension(model)
        try:
            new_index(dim, factory, plan.count)  # a bad --index fails now, not after the corpus is embedded
        except ValueError as e:
            raise SearchError(f"--index {factory}: {e}") from e
        build.embed(plan, lambda texts: encode(model, texts, batch_size=batch_size), progress=progress)
        index = build.build_index(plan, dim, factory)
        manifest = None
        if main:
            manifest = _manifest(digest, index, factory, files, model_dir, corpus, text_column, plan.id_column,
                                 header, label_column)
            _save(out, index, build.ids(plan), manifest, build.labels(plan), overwrite)
            build.remove()
    return distributed.broadcast_object(manifest)


def _manifest(digest: str, index, factory: str, files: dict, model_dir: Path, corpus: Path, text_column: str,
              id_column: str | None, header: bool, label_column: str | None) -> dict:
    from embedft.evaluation.index import index_manifest

    return index_manifest(digest, index, factory, True, model_files=files, model_dir=str(model_dir.resolve()),
                          corpus=str(corpus.resolve()), text_column=text_column, id_column=id_column,
                          header=header, label_column=label_column)


def _save(out: Path, index, ids, manifest: dict, labels, overwrite: bool) -> None:
    from embedft.evaluation.index import save_index

    try:
        save_index(out, index, ids, manifest, labels=labels, overwrite=overwrite)
    except FileExistsError as e:  # checked above, but another `index build --out` wrote it while this one ran
        raise SearchError(f"{e} (another index build to the same --out finished first?)") from e


Hits = list[tuple[str, float]]  # (document id, score), best first


@dataclass
class IndexFolder:
    """An `index_corpus` folder, read once: the FAISS index, its row ids and its manifest."""

    path: Path
    index: Any  # faiss.Index
    ids: list[str]
    manifest: dict


def open_index(index_dir: str | Path) -> IndexFolder:
    """Read an `index_corpus` folder (its files checked against each other by `index.load_index`)."""
    from embedft.evaluation.index import load_index

    try:
        index, ids, manifest = load_index(index_dir)
    except ValueError as e:
        raise SearchError(str(e)) from e
    if "model_dir" not in manifest and "base_model" in manifest:  # `embedft eval --save-index` wrote it
        raise SearchError(f"{index_dir} was written by `embedft eval --save-index` (the adapter "
                          f"{manifest.get('adapter')} on {manifest.get('base_model')}), which no export's weights "
                          "match; to search with an export, build its index with `embedft index build --model "
                          "EXPORT --corpus FILE`")
    return IndexFolder(Path(index_dir), index, ids, manifest)


def search_index(folder: IndexFolder, queries: Sequence[str], k: int = 10, model_dir: str | Path | None = None,
                 batch_size: int = ENCODE_BATCH_SIZE, device: str = "auto", ef_search: int | None = None,
                 nprobe: int | None = None, progress: bool = False) -> list[Hits]:
    """Top-k (id, score) per query from an `index_corpus` folder, best first.

    Queries are embedded by the export the index was built with (or `model_dir`, which must
    have the same weights), with its query prompt. `ef_search` / `nprobe` override the HNSW /
    IVF search knobs the index was saved with (`index.tune_search`). `device`: as for `index_corpus`.
    """
    from sentence_transformers import SentenceTransformer

    from embedft.evaluation.index import search, tune_search
    from embedft.modeling.runtime import resolve_device

    dev = str(resolve_device(device, "--device"))

    for option, knob in (("--ef-search", {"ef_search": ef_search}), ("--nprobe", {"nprobe": nprobe})):
        try:
            tune_search(folder.index, **knob)
        except ValueError as e:
            raise SearchError(f"{option}: {e} (built with --index {folder.manifest.get('factory')})") from e

    if not queries:
        raise SearchError("no queries: pass them as arguments or in a file with --queries")
    empty = [i for i, q in enumerate(queries) if not q.strip()]
    if empty:
        raise SearchError(f"empty queries at positions {empty[:10]} (0-based); remove them")
    manifest = folder.manifest
    if model_dir is None and not (manifest.get("model_dir") and Path(manifest["model_dir"]).is_dir()):
        raise SearchError(f"{folder.path} was built with the export {manifest.get('model_dir')}, which is not there "
                          f"any more; pass --model with a copy of that export")
    model = Path(model_dir if model_dir is not None else manifest["model_dir"])
    _require_export(model)
    # The export the index was built with, untouched since: its recorded digest holds, and reading
    # every weight again (seconds for a 0.6B model) is skipped. A copy, or a changed file, is hashed.
    digest = manifest.get("model") if manifest.get("model_files") == weights_stat(model) else weights_digest(model)
    if manifest.get("model") != digest:
        raise SearchError(f"{folder.path} was built with another model (weights digest {manifest.get('model')}) "
                          f"than {model} ({digest}); pass --model with the export it was built with, or "
                          f"rebuild it with `embedft index build --model {model}`")
    if not 1 <= k <= folder.index.ntotal:
        raise SearchError(f"-k {k}: choose k between 1 and {folder.index.ntotal}, the number of indexed documents")
    st = SentenceTransformer(str(model), device=dev)
    vectors = encode(st, queries, prompt_name="query" if "query" in st.prompts else None, batch_size=batch_size,
                     progress=progress)
    scores, rows = search(folder.index, vectors, k)
    return [[(folder.ids[r], float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)]


def corpus_texts(folder: IndexFolder) -> dict[str, str]:
    """id -> text of the corpus an index was built from (read again from the file its manifest names)."""
    manifest = folder.manifest
    corpus = Path(manifest["corpus"])
    if not corpus.is_file():
        raise SearchError(f"{folder.path} was built from {corpus}, which is not there any more; "
                          f"search without --show-text")
    rows = read_corpus(corpus, manifest["text_column"], manifest["id_column"], manifest.get("header", True))
    if manifest["id_column"] is None and folder.ids[:1] == ["0"]:
        rows.ids = [str(i) for i in range(len(rows.ids))]  # built before ids were row numbers (which start at 1)
    if rows.ids != folder.ids:
        raise SearchError(f"{corpus} changed since the index was built (its ids are not the indexed ones); "
                          f"rebuild the index or search without --show-text")
    return dict(zip(rows.ids, rows.texts))


def index_labels(folder: IndexFolder) -> dict[str, str]:
    """id -> label of an index built with a label column."""
    from embedft.evaluation.index import LABELS_FILE

    path = folder.path / LABELS_FILE
    if not path.is_file():
        raise SearchError(f"{folder.path} holds no labels; rebuild it with `embedft index build --label-column ...` "
                          f"to classify")
    return dict(zip(folder.ids, json.loads(path.read_text(encoding="utf-8"))))


def classify(hits: Sequence[Hits], label_of: dict[str, str], weighted: bool = True) -> list[str | None]:
    """Label per query by the vote of its hits' labels (similarity-weighted, as the evaluation's kNN
    classification votes); None for a query without hits."""
    from embedft.evaluation.metrics import knn_vote

    classes = sorted(set(label_of.values()))
    class_id = {c: n for n, c in enumerate(classes)}
    width = max((len(h) for h in hits), default=0)
    neighbours = np.full((len(hits), width), -1, dtype=np.int64)  # (Q, k) class ids, -1 pads
    scores = np.zeros((len(hits), width), dtype=np.float32)  # (Q, k)
    for q, h in enumerate(hits):
        neighbours[q, :len(h)] = [class_id[label_of[i]] for i, _ in h]
        scores[q, :len(h)] = [s for _, s in h]
    return [classes[c] if c >= 0 else None for c in knn_vote(neighbours, scores, len(classes), weighted=weighted)]


def results_records(query_ids: Sequence[str], queries: Sequence[str], hits: Sequence[Hits],
                    texts: dict[str, str] | None = None, labels: Sequence[str | None] | None = None) -> list[dict]:
    """One JSON-ready record per query: its id, text, predicted label (when given) and ranked hits
    (with document text when given)."""
    return [{"query_id": qid, "query": q, **({"label": labels[n]} if labels is not None else {}),
             "hits": [{"rank": r, "id": i, "score": round(s, 6), **({"text": texts[i]} if texts else {})}
                      for r, (i, s) in enumerate(h, 1)]}
            for n, (qid, q, h) in enumerate(zip(query_ids, queries, hits))]


def check_results_path(path: str | Path) -> None:
    """Refuse a results file `write_results` cannot write (a folder there), before the search."""
    if Path(path).is_dir():
        raise SearchError(f"--out {path} is a folder; pass a file name for the JSON lines, e.g. {Path(path) / 'hits.jsonl'}")


def write_results(path: str | Path, records: Sequence[dict]) -> None:
    """JSON lines, written whole or not at all."""
    check_results_path(path)
    write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def format_results(records: Sequence[dict]) -> str:
    """The records as a readable listing: each query, then rank, score, id (and text) per hit."""
    lines = []
    for rec in records:
        lines.append(f"query {rec['query_id']}: {rec['query']}" + (f"  -> {rec['label']}" if "label" in rec else ""))
        lines += [f"  {h['rank']:>3}  {h['score']:.4f}  {h['id']}" + (f"  {h['text']}" if "text" in h else "")
                  for h in rec["hits"]]
    return "\n".join(lines)
