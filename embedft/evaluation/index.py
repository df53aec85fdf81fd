"""FAISS indexes over normalised embeddings: build, search, ANN quality, save/load.

All indexes use the inner-product metric; callers pass L2-normalised vectors
(see :func:`normalize`) so inner product equals cosine similarity. Row ``i`` of
an index is corpus item ``i``; the mapping to external ids lives in ``ids.json``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from embedft.atomic import building, place_new_dir, replace_dir, write_chunks, write_text
from embedft.errors import WriteError

__all__ = [
    "normalize",
    "build_index",
    "search",
    "search_excluding_self",
    "exact_search",
    "TorchFlatIP",
    "ann_report",
    "save_index",
    "load_index",
]


# faiss warns (on stderr only) below this many training points per k-means centroid (IVF lists, PQ codes).
_MIN_POINTS_PER_CENTROID = 39
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
LABELS_FILE = "labels.json"  # optional: one label per indexed row, for kNN classification
MANIFEST_FILE = "manifest.json"
_REBUILD_HINT = "rebuild the index with `embedft index build`"
INDEX_WRITE_FIX = "check free space and permissions there, or write the index elsewhere (--out); an earlier index is kept"


def normalize(x: np.ndarray) -> np.ndarray:
    """Float32 C-contiguous copy of x with unit-L2 rows (zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D (n, dim) array of vectors, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # Dividing a zero row by 1 keeps it zero instead of producing NaNs.
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _as_matrix(x: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    # faiss needs float32 C-contiguous input; anything else fails deep in SWIG.
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (n, dim) array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"{what} have dimension {x.shape[1]} but the index has dimension {dim}; embed them with the same model"
        )
    return x


def _json_default(obj: Any) -> Any:
    # Callers often pass numpy scalars (e.g. a dim taken from an array shape).
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable; pass plain Python values in the manifest and ids")


def _gpu_available() -> bool:
    # faiss-cpu wheels have get_num_gpus() but no StandardGpuResources.
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class TorchFlatIP:
    """Exact inner-product search by a torch matmul + top-k, for GPUs where faiss has no GPU build.

    Quacks like a faiss index for :func:`search` (``d``, ``ntotal``, ``search``). fp32 throughout
    (no TF32), so it ranks as IndexFlatIP does; queries go in chunks that keep the (chunk, N)
    score matrix within ``max_scores_bytes``.
    """

    def __init__(self, vectors: np.ndarray, device: str = "cuda", max_scores_bytes: int = 1 << 30):
        import torch

        vectors = _as_matrix(vectors, "vectors")
        self.ntotal, self.d = vectors.shape
        self.device = torch.device(device)
        self._corpus = torch.from_numpy(vectors).to(self.device)
        self._chunk = max(1, max_scores_bytes // (4 * max(self.ntotal, 1)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        with torch.inference_mode():
            for i in range(0, len(queries), self._chunk):
                q = torch.from_numpy(queries[i:i + self._chunk]).to(self.device)
                top = torch.topk(q @ self._corpus.T, k, dim=1)
                scores[i:i + len(q)] = top.values.cpu().numpy()
                ids[i:i + len(q)] = top.indices.cpu().numpy()
        return scores, ids


def _is_gpu_index(index: faiss.Index) -> bool:
    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def _ivf_nlist(index: faiss.Index) -> int | None:
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:  # not an IVF index
        return None


def _set_knob(index: faiss.Index, name: str, value: int) -> bool:
    # A faiss search parameter (efSearch, nprobe); False when the index has no such knob
    # (Flat has none, an IVF no efSearch, a GPU index no efSearch).
    space = faiss.GpuParameterSpace() if _is_gpu_index(index) else faiss.ParameterSpace()
    try:
        space.set_index_parameter(index, name, value)
    except RuntimeError:
        return False
    return True


def _set_search_params(index: faiss.Index, ef_search: int, nprobe: int, nlist: int | None) -> None:
    # Build-time defaults: whichever of the knobs the index has.
    _set_knob(index, "efSearch", ef_search)
    if nlist is not None:
        _set_knob(index, "nprobe", min(nprobe, nlist))


def _ivf_suggestion(n: int) -> str:
    return f"use IVF{max(1, n // _MIN_POINTS_PER_CENTROID)} or 'Flat'"


def tune_search(index: faiss.Index, ef_search: int | None = None, nprobe: int | None = None) -> None:
    """Set an index's search-time knobs; one the index does not have is refused, not ignored.

    efSearch (HNSW): candidates kept while walking the graph; higher finds more of the true
    neighbours, slower. nprobe (IVF): lists scanned per query, 1..nlist; nlist scans them all,
    as an exact search does for IVF,Flat.
    """
    kind = type(faiss.downcast_index(index)).__name__
    if ef_search is not None:
        if ef_search < 1:
            raise ValueError(f"efSearch must be >= 1, got {ef_search}")
        if not _set_knob(index, "efSearch", ef_search):
            raise ValueError(f"efSearch is a knob of HNSW indexes; this index is {kind}")
    if nprobe is not None:
        nlist = _ivf_nlist(index)
        if nlist is None:
            raise ValueError(f"nprobe is a knob of IVF indexes; this index is {kind}")
        if not 1 <= nprobe <= nlist:
            raise ValueError(f"nprobe must be between 1 and {nlist} (the index's IVF lists), got {nprobe}")
        _set_knob(index, "nprobe", nprobe)


def check_factory(factory: str) -> None:
    """Refuse a factory string faiss cannot parse for any common dimension, before the model's
    dimension is known (a factory that fits only some dimensions is checked by `new_index` later)."""
    errors = []
    for dim in (384, 768, 1024):
        try:
            faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            return
        except RuntimeError as exc:
            errors.append(str(exc).strip().splitlines()[-1].rsplit(": ", 1)[-1])
    if not any("could not parse" in e for e in errors):  # e.g. PQ7: fine for a dimension that 7 divides
        return
    raise ValueError(f"faiss cannot parse index factory {factory!r} ({errors[0]}){_case_hint(384, factory)}; "
                     "examples: Flat, HNSW32, IVF256,Flat, IVF256,PQ32")


def new_index(dim: int, factory: str, n: int) -> faiss.Index:
    """An empty inner-product index for `n` vectors of `dim`, from a faiss factory string.

    Refuses what faiss cannot build before any vector exists (so before a corpus is
    embedded): a factory it cannot parse, no vectors, or more IVF lists than vectors.
    """
    if n == 0:
        raise ValueError("cannot build an index from 0 vectors; check the corpus is not empty")
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"faiss cannot parse index factory {factory!r}: {exc}{_case_hint(dim, factory)}") from exc
    nlist = _ivf_nlist(index)
    if nlist is not None and not index.is_trained and n < nlist:
        # faiss itself raises an opaque C++ assertion here (nx >= k in Clustering).
        raise ValueError(f"factory {factory!r} needs at least {nlist} training vectors (one per IVF list) "
                         f"but only N={n} were given; {_ivf_suggestion(n)}")
    ksub = _pq_centroids(index)
    if ksub is not None and n < _MIN_POINTS_PER_CENTROID * ksub:
        # faiss only warns below this, and with barely more vectors than centroids it can corrupt its heap and
        # kill the process (seen: OPQ8,IVF4,PQ8 on 260 vectors of dim 384, "free(): invalid size").
        raise ValueError(f"factory {factory!r} trains {ksub} centroids per product-quantizer code, which needs at "
                         f"least {_MIN_POINTS_PER_CENTROID * ksub} training vectors ({_MIN_POINTS_PER_CENTROID} per "
                         f"centroid, faiss's minimum) but only N={n} were given; use Flat or HNSW32 for a corpus "
                         f"this small" + (", or 4 bits per code (PQ8x4: 16 centroids)" if ksub > 16 and
                                          n >= _MIN_POINTS_PER_CENTROID * 16 else ""))
    return index


def _pq_centroids(index: faiss.Index) -> int | None:
    # The most centroids a product quantizer of the index trains (2**nbits; OPQ's own is 8-bit), None without one.
    ks = []
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            if isinstance(faiss.downcast_VectorTransform(index.chain.at(i)), faiss.OPQMatrix):
                ks.append(256)
        index = faiss.downcast_index(index.index)
    if getattr(index, "storage", None) is not None:  # HNSW over PQ codes
        index = faiss.downcast_index(index.storage)
    if getattr(index, "pq", None) is not None:
        ks.append(int(index.pq.ksub))
    return max(ks) if ks else None


def _case_hint(dim: int, factory: str) -> str:
    # Factory strings are case-sensitive (HNSW32, IVF4,Flat, SQfp16): suggest a spelling only when faiss parses it.
    guess = factory.upper().replace("FLAT", "Flat")
    if guess == factory:
        return ""
    try:
        faiss.index_factory(dim, guess, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        return ""
    return f" (factory strings are case-sensitive: did you mean {guess!r}?)"


def build_index(
    vectors: np.ndarray,
    factory: str = "Flat",
    use_gpu: bool | None = None,
    *,
    ef_search: int = 128,
    nprobe: int = 16,
    train: np.ndarray | None = None,
) -> faiss.Index:
    """Inner-product index built with faiss.index_factory, trained if needed, holding all vectors.

    `train`: the vectors an index that needs training is trained on (`train_rows` of them), all by default.
    """
    vectors = _as_matrix(vectors, "vectors")
    n, dim = vectors.shape
    index = new_index(dim, factory, n)
    nlist = _ivf_nlist(index)
    _warn_few_per_list(index, factory, n)

    if use_gpu is None:
        use_gpu = _gpu_available()
        strict = False
    else:
        strict = use_gpu
    if use_gpu:
        if not _gpu_available():
            raise ValueError(
                "use_gpu=True but this faiss has no usable GPU (faiss-cpu build or no visible GPU); "
                "install faiss-gpu or pass use_gpu=False"
            )
        res = faiss.StandardGpuResources()
        try:
            # Move before training so IVF k-means also runs on the GPU.
            gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
        except RuntimeError as exc:
            if strict:
                raise ValueError(f"factory {factory!r} is not supported on GPU ({exc}); pass use_gpu=False") from exc
            warnings.warn(f"factory {factory!r} is not supported on GPU; building it on CPU", stacklevel=2)
        else:
            # index_cpu_to_gpu keeps no Python reference to the resources; without
            # this they would be freed while the index still uses them.
            gpu_index.referenced_objects = [res]
            index = gpu_index

    _train(index, vectors if train is None else _as_matrix(train, "training vectors", dim), factory, n)
    index.add(vectors)
    _set_search_params(index, ef_search, nprobe, nlist)
    return index


def _warn_few_per_list(index: faiss.Index, factory: str, n: int) -> None:
    nlist = _ivf_nlist(index)
    if nlist is not None and not index.is_trained and n < _MIN_POINTS_PER_CENTROID * nlist:
        warnings.warn(
            f"factory {factory!r}: N={n} vectors is fewer than the {_MIN_POINTS_PER_CENTROID * nlist} "
            f"faiss recommends ({_MIN_POINTS_PER_CENTROID} per IVF list), so clustering will be poor; "
            f"{_ivf_suggestion(n)}",
            stacklevel=3,
        )


def _train(index: faiss.Index, vectors: np.ndarray, factory: str, n: int) -> None:
    if not index.is_trained:
        try:
            index.train(vectors)
        except RuntimeError as exc:
            # e.g. PQ needs 2**nbits training points; faiss's message says which.
            raise ValueError(f"training factory {factory!r} on N={n} vectors failed: {exc}") from exc


# faiss's k-means subsamples its training set to this many points per centroid (max_points_per_centroid), so
# a sample of that size trains an index as all the vectors would, less faiss's own draw.
TRAIN_POINTS_PER_CENTROID = 256
# Training points, at least, for an index trained otherwise than by k-means (a scalar quantizer's ranges).
MIN_TRAIN_POINTS = 65_536


def train_size(index: faiss.Index, n: int) -> int:
    """How many of n vectors an index (`new_index`) is trained on: 0 when it needs no training (Flat, HNSW);
    else 256 per centroid of its largest k-means (IVF lists, product-quantizer codes), at least 65,536, at most n.
    The vectors a build holds in memory besides the index while it trains."""
    if index.is_trained:
        return 0
    centroids = max(_ivf_nlist(index) or 0, _pq_centroids(index) or 0)
    return min(n, max(MIN_TRAIN_POINTS, TRAIN_POINTS_PER_CENTROID * centroids))


def train_rows(n: int, m: int, seed: int = 0) -> np.ndarray:
    """The rows, in order, that an index trained on m of n vectors takes: all when m >= n, else a sample
    drawn with `seed`, the same wherever the vectors are held (in memory or in on-disk shards)."""
    if m >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))


def trained_index(dim: int, factory: str, n: int, train: np.ndarray | None) -> faiss.Index:
    """An empty index (`new_index`) for n vectors, trained on `train` when it needs training (CPU)."""
    index = new_index(dim, factory, n)
    _warn_few_per_list(index, factory, n)
    if not index.is_trained:
        _train(index, _as_matrix(train, "training vectors", dim), factory, n)
    return index


def build_index_in_parts(dim: int, factory: str, n: int, train: np.ndarray | None, parts: Iterable[np.ndarray],
                         *, ef_search: int = 128, nprobe: int = 16) -> faiss.Index:
    """`build_index` (on the CPU) of n vectors that come in parts, in row order (on-disk shards): trained on
    `train` (`train_rows` of them; None for an index that needs no training), then each part added.
    Equal to `build_index(all vectors, train=train)` for Flat and IVF indexes; an HNSW graph grown in
    parts differs a little from one grown at once (its recall does not)."""
    index = trained_index(dim, factory, n, train)
    if isinstance(faiss.downcast_index(index), faiss.IndexFlatCodes):
        _fill_codes(faiss.downcast_index(index), parts, n)
    else:
        for part in parts:
            index.add(_as_matrix(part, "vectors", dim))
    if index.ntotal != n:
        raise ValueError(f"the parts hold {index.ntotal} vectors, not the {n} expected; rebuild the index")
    _set_search_params(index, ef_search, nprobe, _ivf_nlist(index))
    return index


def _fill_codes(index: faiss.IndexFlatCodes, parts: Iterable[np.ndarray], n: int) -> None:
    # A flat index's codes sized once and filled in place: `add` part by part grows faiss's buffer by
    # doubling, which holds up to 1.6x the index at its peak (measured, 40 parts of a Flat index).
    size = index.code_size
    index.codes.resize(n * size)
    codes = faiss.rev_swig_ptr(index.codes.data(), n * size)  # a numpy view of the buffer
    at = 0
    for part in parts:
        part = _as_matrix(part, "vectors", index.d)
        if at + len(part) > n:
            raise ValueError(f"the parts hold more than the {n} vectors expected; rebuild the index")
        codes[at * size:(at + len(part)) * size] = index.sa_encode(part).ravel()
        at += len(part)
    index.ntotal = at


def mergeable(index: faiss.Index) -> bool:
    """Whether parts of the index can be filled apart and merged (`index_part`, `merge_parts`): an IVF index,
    whose rows carry their ids in its inverted lists."""
    return _ivf_nlist(index) is not None


def index_part(trained: faiss.Index, vectors: np.ndarray, first_row: int) -> faiss.Index:
    """A copy of a trained, empty IVF index holding `vectors` as rows first_row, first_row + 1, ...: one
    process's share of a build, for `merge_parts`."""
    part = faiss.clone_index(trained)
    vectors = _as_matrix(vectors, "vectors", trained.d)
    part.add_with_ids(vectors, np.arange(first_row, first_row + len(vectors), dtype=np.int64))
    return part


def merge_parts(trained: faiss.Index, parts: Iterable[faiss.Index], n: int, *, ef_search: int = 128,
                nprobe: int = 16) -> faiss.Index:
    """The trained IVF index holding every part's rows (`index_part`), parts given in row order: then each
    inverted list holds its rows in order, and the index is the one `build_index_in_parts` adds (the same bytes)."""
    for part in parts:
        trained.merge_from(part, 0)
    if trained.ntotal != n:
        raise ValueError(f"the parts hold {trained.ntotal} vectors, not the {n} expected; rebuild the index")
    _set_search_params(trained, ef_search, nprobe, _ivf_nlist(trained))
    return trained


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores (Q, k) float32, ids (Q, k) int64), best first; -1 ids mark missing results."""
    queries = _as_matrix(queries, "queries", index.d)
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k > index.ntotal:
        raise ValueError(f"k={k} is larger than the corpus ({index.ntotal} vectors); lower k")
    scores, ids = index.search(queries, k)
    return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


def search_excluding_self(
    index: faiss.Index, queries: np.ndarray, k: int, self_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over the corpus minus each query's own row self_ids[i] (for corpus-as-queries evaluation)."""
    queries = _as_matrix(queries, "queries", index.d)
    self_ids = np.asarray(self_ids, dtype=np.int64).ravel()
    if self_ids.shape[0] != queries.shape[0]:
        raise ValueError(
            f"got {queries.shape[0]} queries but {self_ids.shape[0]} self_ids; pass one corpus row per query"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k + 1 > index.ntotal:
        raise ValueError(
            f"k={k} is larger than the corpus without the query itself ({index.ntotal - 1} vectors); lower k"
        )
    scores, ids = search(index, queries, k + 1)
    n_queries = ids.shape[0]
    is_self = ids == self_ids[:, None]
    # If an ANN index missed the query itself, its k+1-th result is the extra one.
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones(ids.shape, dtype=bool)
    keep[np.arange(n_queries), drop] = False
    return scores[keep].reshape(n_queries, k), ids[keep].reshape(n_queries, k)


def exact_search(
    corpus: np.ndarray,
    queries: np.ndarray,
    k: int,
    self_ids: np.ndarray | None = None,
    *,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of queries against corpus (optionally excluding each query's own row).

    On GPU: faiss-gpu when installed, else torch (same ranking) when CUDA is visible; use_gpu=False
    keeps it on the CPU.
    """
    if use_gpu is not False and len(corpus) and not _gpu_available() and _torch_cuda_available():
        index = TorchFlatIP(corpus, "cuda")
    else:
        index = build_index(corpus, "Flat", use_gpu=use_gpu)
    if self_ids is None:
        return search(index, queries, k)
    return search_excluding_self(index, queries, k, self_ids)


def ann_report(
    corpus: np.ndarray,
    queries: np.ndarray,
    k: int,
    factory: str,
    self_ids: np.ndarray | None = None,
    *,
    use_gpu: bool | None = None,
    ef_search: int = 128,
    nprobe: int = 16,
) -> tuple[dict[str, float], np.ndarray]:
    """ANN quality vs exact search: ({factory}/recall_of_exact@k, /qps, /build_s), and the ANN's (Q, k) ids."""
    _, exact_ids = exact_search(corpus, queries, k, self_ids, use_gpu=use_gpu)

    start = time.perf_counter()
    index = build_index(corpus, factory, use_gpu=use_gpu, ef_search=ef_search, nprobe=nprobe)
    build_s = time.perf_counter() - start

    start = time.perf_counter()
    if self_ids is None:
        _, ann_ids = search(index, queries, k)
    else:
        _, ann_ids = search_excluding_self(index, queries, k, self_ids)
    search_s = time.perf_counter() - start

    found = sum(
        np.intersect1d(ann_row[ann_row >= 0], exact_row, assume_unique=True).size
        for ann_row, exact_row in zip(ann_ids, exact_ids)
    )
    n_queries = ann_ids.shape[0]
    metrics = {
        f"{factory}/recall_of_exact@{k}": float(found / (n_queries * k)),
        # Guard against a zero timer reading on tiny inputs.
        f"{factory}/qps": float(n_queries / max(search_s, 1e-9)),
        f"{factory}/build_s": float(build_s),
    }
    return metrics, ann_ids


def index_manifest(model: str, index: faiss.Index, factory: str, normalized: bool, **source: Any) -> dict[str, Any]:
    """What every index folder's manifest.json says: the model that embedded it (an export's weights
    digest, or a base fingerprint with its adapter), the index's shape, and where its rows came from."""
    return {"model": model, "dim": int(index.d), "metric": "inner_product", "normalized": normalized,
            "factory": factory, "count": int(index.ntotal), **source}


@dataclass(frozen=True)
class ListParts:
    """A list too long to hold at once (a large corpus's ids or labels): its length, and a function that
    gives its items part by part, in order (called once per use). `save_index` writes it as one JSON list."""

    count: int
    parts: Callable[[], Iterable[Sequence]]

    def __len__(self) -> int:
        return self.count


def _json_list(items: Sequence | ListParts) -> Iterator[bytes]:
    # The bytes of json.dumps(list(items)), a part at a time.
    yield b"["
    first = True
    for part in items.parts() if isinstance(items, ListParts) else [items]:
        if len(part):
            text = json.dumps(list(part), default=_json_default)[1:-1]
            yield (text if first else ", " + text).encode("utf-8")
            first = False
    yield b"]"


def save_index(
    out_dir: str | os.PathLike,
    index: faiss.Index,
    ids: Sequence[str] | np.ndarray | ListParts,
    manifest: dict[str, Any],
    *,
    labels: Sequence[str] | ListParts | None = None,
    overwrite: bool = False,
) -> Path:
    """Write index.faiss, ids.json, manifest.json (and labels.json) into out_dir atomically; returns out_dir.

    ids and labels may come in parts (`ListParts`), for a corpus whose ids are not held in memory."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a folder; choose another output path")
        if any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{out_dir} already exists and is not empty; pass --overwrite (overwrite=True from Python) to replace it"
            )

    ids_list = ids.tolist() if isinstance(ids, np.ndarray) else ids if isinstance(ids, ListParts) else list(ids)
    if len(ids_list) != index.ntotal:
        raise ValueError(f"got {len(ids_list)} ids for an index of {index.ntotal} vectors; pass one id per indexed row")
    if labels is not None and len(labels) != index.ntotal:
        raise ValueError(f"got {len(labels)} labels for an index of {index.ntotal} vectors; pass one per indexed row")
    if "dim" in manifest and int(manifest["dim"]) != index.d:
        raise ValueError(f"manifest says dim={manifest['dim']} but the index has dimension {index.d}; fix the manifest")

    full_manifest = dict(manifest)
    full_manifest.update(
        ntotal=int(index.ntotal),
        faiss_version=faiss.__version__,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if _is_gpu_index(index):
        index = faiss.index_gpu_to_cpu(index)  # write_index only serialises CPU indexes

    with building(out_dir, "write the index elsewhere with --out", "an earlier index is kept") as tmp_dir:
        try:
            faiss.write_index(index, str(tmp_dir / INDEX_FILE))  # streamed by faiss: no copy of a large index
        except RuntimeError as e:  # faiss's fwrite failures carry no errno: say what to check
            raise WriteError(f"cannot write {out_dir / INDEX_FILE}: faiss could not write it "
                             f"({str(e).strip().splitlines()[-1][-200:]}); {INDEX_WRITE_FIX}") from e
        write_chunks(tmp_dir / IDS_FILE, _json_list(ids_list))
        if labels is not None:
            write_chunks(tmp_dir / LABELS_FILE, _json_list(labels))
        manifest_text = json.dumps(full_manifest, indent=2, sort_keys=True, default=_json_default) + "\n"
        write_text(tmp_dir / MANIFEST_FILE, manifest_text)
        if overwrite:
            replace_dir(tmp_dir, out_dir)
        else:  # rename() refuses a folder another process filled since the check above
            place_new_dir(tmp_dir, out_dir)
    return out_dir


def load_index(
    index_dir: str | os.PathLike,
    expected_model: str | None = None,
    expected_dim: int | None = None,
) -> tuple[faiss.Index, list, dict[str, Any]]:
    """Read (CPU index, ids, manifest) from a save_index folder, checking model and dimension."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise FileNotFoundError(f"index folder {index_dir} does not exist; build it with `embedft index build`")
    manifest_path = index_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{index_dir} has no {MANIFEST_FILE}, so it is not an embedft index folder; {_REBUILD_HINT}"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest_path} is not valid JSON ({exc}); {_REBUILD_HINT}") from exc
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path} holds a {type(manifest).__name__}, not the manifest object; {_REBUILD_HINT}")

    # Check the manifest before reading a possibly large index file.
    if expected_model is not None and manifest.get("model") != expected_model:
        raise ValueError(
            f"index at {index_dir} was built with model {manifest.get('model')!r} but model {expected_model!r} "
            f"is expected; {_REBUILD_HINT}"
        )
    if expected_dim is not None and "dim" in manifest and manifest["dim"] != expected_dim:
        raise ValueError(
            f"index at {index_dir} has dimension {manifest['dim']} but dimension {expected_dim} "
            f"is expected; {_REBUILD_HINT}"
        )

    for name in (INDEX_FILE, IDS_FILE):
        if not (index_dir / name).is_file():
            raise FileNotFoundError(f"{index_dir} has no {name}; {_REBUILD_HINT}")
    try:
        index = faiss.read_index(str(index_dir / INDEX_FILE))
    except RuntimeError as exc:  # faiss' C++ read errors (a truncated or overwritten file)
        raise ValueError(f"{index_dir / INDEX_FILE} cannot be read by faiss ({str(exc).splitlines()[-1][:300]}); "
                         f"the index is damaged: {_REBUILD_HINT}") from exc
    try:
        ids = json.loads((index_dir / IDS_FILE).read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{index_dir / IDS_FILE} is not valid JSON ({exc}); {_REBUILD_HINT}") from exc
    if not isinstance(ids, list):
        raise ValueError(f"{index_dir / IDS_FILE} holds a {type(ids).__name__}, not a list of ids; {_REBUILD_HINT}")
    if len(ids) != index.ntotal:
        raise ValueError(f"{index_dir} has {len(ids)} ids for {index.ntotal} vectors; {_REBUILD_HINT}")
    if "dim" in manifest and manifest["dim"] != index.d:
        raise ValueError(
            f"{index_dir}: manifest says dim={manifest['dim']} but the index has dimension {index.d}; {_REBUILD_HINT}"
        )
    if expected_dim is not None and index.d != expected_dim:
        raise ValueError(
            f"index at {index_dir} has dimension {index.d} but dimension {expected_dim} is expected; {_REBUILD_HINT}"
        )
    return index, ids, manifest
