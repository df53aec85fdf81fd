import json

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from embedft.evaluation.index import (
    TorchFlatIP,
    ann_report,
    build_index,
    exact_search,
    load_index,
    normalize,
    save_index,
    search,
    search_excluding_self,
    tune_search,
)

N, D, Q, K = 300, 16, 20, 10


@pytest.fixture(scope="module")
def data():
    # Random floats: no ties, so FAISS and numpy must agree on the order.
    rng = np.random.default_rng(0)
    corpus = normalize(rng.standard_normal((N, D)))
    queries = normalize(rng.standard_normal((Q, D)))
    return corpus, queries


def brute_force(corpus, queries, k, self_ids=None):
    scores = queries @ corpus.T
    if self_ids is not None:
        scores[np.arange(len(queries)), self_ids] = -np.inf
    ids = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def test_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float64)
    out = normalize(x)
    assert out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    assert x[0, 0] == 3.0  # input untouched


def test_flat_matches_numpy(data):
    corpus, queries = data
    scores, ids = search(build_index(corpus), queries, K)
    ref_scores, ref_ids = brute_force(corpus, queries, K)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_search_excluding_self_matches_numpy(data):
    corpus, _ = data
    self_ids = np.arange(0, N, 7)
    scores, ids = search_excluding_self(build_index(corpus), corpus[self_ids], K, self_ids)
    ref_scores, ref_ids = brute_force(corpus, corpus[self_ids], K, self_ids)
    assert not np.any(ids == self_ids[:, None])
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    # exact_search is the same thing in one call
    np.testing.assert_array_equal(exact_search(corpus, corpus[self_ids], K, self_ids)[1], ref_ids)


def test_torch_exact_search_matches_numpy_across_query_chunks(data):
    # The GPU fallback when faiss has no GPU build; run on CPU here, in chunks of 3 queries.
    corpus, queries = data
    index = TorchFlatIP(corpus, "cpu", max_scores_bytes=3 * 4 * N)
    assert (index.ntotal, index.d, index._chunk) == (N, D, 3)
    scores, ids = search(index, queries, K)
    ref_scores, ref_ids = brute_force(corpus, queries, K)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    self_ids = np.arange(0, N, 7)
    np.testing.assert_array_equal(search_excluding_self(index, corpus[self_ids], K, self_ids)[1],
                                  brute_force(corpus, corpus[self_ids], K, self_ids)[1])


def test_exact_search_uses_torch_on_cuda_without_faiss_gpu(data, monkeypatch):
    import embedft.evaluation.index as index_mod

    made = []

    class Spy(TorchFlatIP):
        def __init__(self, vectors, device="cuda", **kw):
            made.append(device)
            super().__init__(vectors, "cpu", **kw)

    corpus, queries = data
    monkeypatch.setattr(index_mod, "_torch_cuda_available", lambda: True)
    monkeypatch.setattr(index_mod, "TorchFlatIP", Spy)
    np.testing.assert_array_equal(exact_search(corpus, queries, K)[1], brute_force(corpus, queries, K)[1])
    assert made == ["cuda"]
    exact_search(corpus, queries, K, use_gpu=False)  # stays on faiss-cpu
    assert made == ["cuda"]


def test_search_excluding_self_drops_last_when_self_not_found(data):
    corpus, queries = data
    index = build_index(corpus)
    # The least similar row is never in the top k+1, so the k+1-th result goes.
    self_ids = np.argmin(queries @ corpus.T, axis=1)
    _, ids = search_excluding_self(index, queries, K, self_ids)
    np.testing.assert_array_equal(ids, search(index, queries, K)[1])


def test_k_larger_than_corpus(data):
    corpus, queries = data
    index = build_index(corpus[:5])
    with pytest.raises(ValueError, match=r"k=6 is larger than the corpus \(5 vectors\); lower k"):
        search(index, queries, 6)
    with pytest.raises(ValueError, match=r"k=5 is larger than the corpus without the query itself \(4 vectors\)"):
        search_excluding_self(index, corpus[:2], 5, np.array([0, 1]))


def test_wrong_query_dimension(data):
    corpus, _ = data
    with pytest.raises(ValueError, match="dimension 8 but the index has dimension 16"):
        search(build_index(corpus), np.zeros((1, 8), dtype=np.float32), 1)


def test_ivf_with_too_few_points(data):
    corpus, _ = data
    with pytest.raises(ValueError, match=r"'IVF64,Flat'.*N=50.*use IVF1"):
        build_index(corpus[:50], "IVF64,Flat")


def test_ivf_sets_nprobe_and_warns_on_thin_clusters(data):
    corpus, queries = data
    # 300 < 39 * 16 points: faiss only prints to stderr, we warn properly.
    with pytest.warns(UserWarning, match=r"use IVF7"):
        index = build_index(corpus, "IVF16,Flat")
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nprobe == 16
    # nprobe == nlist visits every list, so the result is exact.
    np.testing.assert_array_equal(search(index, queries, K)[1], brute_force(corpus, queries, K)[1])
    assert faiss.extract_index_ivf(build_index(corpus[:200], "IVF4,Flat", nprobe=2)).nprobe == 2


def test_pq_with_too_few_training_vectors_is_refused_before_faiss_trains():
    corpus = normalize(np.random.default_rng(1).standard_normal((700, D)))
    # 8-bit codes: 256 centroids, 39 training vectors each (faiss only warns; barely above 256 it can crash).
    with pytest.raises(ValueError, match=r"factory 'PQ4' trains 256 centroids per product-quantizer code, which "
                                         r"needs at least 9984 training vectors .* N=700 were given; use Flat or "
                                         r"HNSW32 for a corpus this small, or 4 bits per code"):
        build_index(corpus[:700], "PQ4")
    for factory in ("OPQ4,IVF2,PQ4", "HNSW32,PQ4", "IVF2,PQ4x4fs"):  # PQ behind a transform, in HNSW, fast-scan
        with pytest.raises(ValueError, match=f"factory '{factory}' trains"):
            build_index(corpus[:100], factory)
    assert build_index(corpus[:700], "PQ4x4").ntotal == 700  # 16 centroids: 624 vectors suffice


def test_bad_factory(data):
    corpus, _ = data
    with pytest.raises(ValueError, match="cannot parse index factory 'Nope'") as e:
        build_index(corpus, "Nope")
    assert "did you mean" not in str(e.value)  # NOPE does not parse either
    with pytest.raises(ValueError, match=r"case-sensitive: did you mean 'IVF2,Flat'\?"):
        build_index(corpus, "ivf2,flat")


def test_gpu_request_without_gpu(data):
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is available")
    corpus, _ = data
    with pytest.raises(ValueError, match="use_gpu=False"):
        build_index(corpus, use_gpu=True)
    assert build_index(corpus, use_gpu=None).ntotal == N  # auto falls back to CPU


def test_hnsw_ann_report(data):
    corpus, queries = data
    metrics, ids = ann_report(corpus, queries, K, "HNSW32")
    assert set(metrics) == {"HNSW32/recall_of_exact@10", "HNSW32/qps", "HNSW32/build_s"}
    assert metrics["HNSW32/recall_of_exact@10"] > 0.9
    assert metrics["HNSW32/qps"] > 0 and metrics["HNSW32/build_s"] >= 0
    assert ids.shape == (Q, K)
    self_ids = np.arange(Q)
    metrics, ids = ann_report(corpus, corpus[:Q], K, "HNSW32", self_ids=self_ids)
    assert metrics["HNSW32/recall_of_exact@10"] > 0.9
    assert not np.any(ids == self_ids[:, None])


def test_hnsw_ef_search_is_set(data):
    corpus, _ = data
    assert faiss.downcast_index(build_index(corpus, "HNSW32")).hnsw.efSearch == 128
    assert faiss.downcast_index(build_index(corpus, "HNSW32", ef_search=64)).hnsw.efSearch == 64


def test_tune_search_sets_the_knob_the_index_has_and_refuses_others(data):
    rng = np.random.default_rng(1)
    corpus, queries = normalize(rng.standard_normal((2000, D))), data[1]
    exact = brute_force(corpus, queries, K)[1]
    ivf = build_index(corpus, "IVF32,Flat")
    tune_search(ivf, nprobe=1)  # one list of 32 per query: most true neighbours are missed
    assert faiss.extract_index_ivf(ivf).nprobe == 1
    assert np.mean([len(set(a) & set(b)) for a, b in zip(search(ivf, queries, K)[1], exact)]) < 0.6 * K
    tune_search(ivf, nprobe=32)  # every list: exact
    np.testing.assert_array_equal(search(ivf, queries, K)[1], exact)
    with pytest.raises(ValueError, match=r"nprobe must be between 1 and 32 \(the index's IVF lists\), got 33"):
        tune_search(ivf, nprobe=33)
    with pytest.raises(ValueError, match="efSearch is a knob of HNSW indexes; this index is IndexIVFFlat"):
        tune_search(ivf, ef_search=64)
    hnsw = build_index(corpus, "HNSW32")
    tune_search(hnsw, ef_search=300)
    assert faiss.downcast_index(hnsw).hnsw.efSearch == 300
    with pytest.raises(ValueError, match="nprobe is a knob of IVF indexes; this index is IndexHNSWFlat"):
        tune_search(hnsw, nprobe=4)
    with pytest.raises(ValueError, match="efSearch must be >= 1"):
        tune_search(hnsw, ef_search=0)
    with pytest.raises(ValueError, match="this index is IndexFlat"):
        tune_search(build_index(corpus, "Flat"), ef_search=64)
    tune_search(build_index(corpus, "Flat"))  # nothing asked: nothing to refuse
    pre = build_index(corpus, "PCA8,IVF16,Flat")  # the IVF behind a transform is found
    tune_search(pre, nprobe=3)
    assert faiss.extract_index_ivf(pre).nprobe == 3


def _manifest(dim=D, model="org/model@abc123"):
    return {"model": model, "dim": dim, "metric": "inner_product", "normalized": True, "factory": "Flat", "count": N}


def test_save_load_roundtrip(data, tmp_path):
    corpus, queries = data
    index = build_index(corpus)
    ids = [f"doc-{i}" for i in range(N)]
    out = save_index(tmp_path / "idx", index, ids, _manifest())
    assert sorted(p.name for p in out.iterdir()) == ["ids.json", "index.faiss", "manifest.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temporary folders left behind

    loaded, loaded_ids, manifest = load_index(out, expected_model="org/model@abc123", expected_dim=D)
    assert loaded_ids == ids
    assert manifest["ntotal"] == N and manifest["faiss_version"] == faiss.__version__
    assert manifest["created_at"] and manifest["model"] == "org/model@abc123"
    for got, want in zip(search(loaded, queries, K), search(index, queries, K)):
        np.testing.assert_array_equal(got, want)


def test_load_with_wrong_model_or_dim(data, tmp_path):
    corpus, _ = data
    out = save_index(tmp_path / "idx", build_index(corpus), np.arange(N), _manifest())
    with pytest.raises(ValueError, match=r"dimension 16 but dimension 32 is expected.*embedft index build"):
        load_index(out, expected_dim=32)
    expected = r"'org/model@abc123' but model 'other/model' is expected.*embedft index build"
    with pytest.raises(ValueError, match=expected):
        load_index(out, expected_model="other/model")


def test_load_missing_folder_or_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_index(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_index(tmp_path / "half")


@pytest.mark.parametrize("name, content, message", [
    ("index.faiss", b"IxF2 truncated", r"index\.faiss cannot be read by faiss \(.*\); the index is damaged"),
    ("manifest.json", b"[]", r"manifest\.json holds a list, not the manifest object"),
    ("ids.json", b"[1, 2", r"ids\.json is not valid JSON"),
    ("ids.json", b'{"a": 1}', r"ids\.json holds a dict, not a list of ids"),
])
def test_load_of_a_damaged_file_names_it_and_the_fix(data, tmp_path, name, content, message):
    corpus, _ = data
    out = save_index(tmp_path / "idx", build_index(corpus[:10]), np.arange(10), _manifest())
    (out / name).write_bytes(content)
    with pytest.raises(ValueError, match=message + r".*embedft index build"):
        load_index(out)


def test_existing_out_dir_needs_overwrite(data, tmp_path):
    corpus, _ = data
    out = tmp_path / "idx"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    index = build_index(corpus[:10])
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_index(out, index, list(range(10)), _manifest())
    assert (out / "stale.txt").exists()  # refused without touching it

    save_index(out, index, list(range(10)), _manifest(), overwrite=True)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["ntotal"] == 10
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]


def test_save_rejects_wrong_id_count(data, tmp_path):
    corpus, _ = data
    with pytest.raises(ValueError, match="got 3 ids for an index of 300 vectors"):
        save_index(tmp_path / "idx", build_index(corpus), ["a", "b", "c"], _manifest())
    assert not any(tmp_path.iterdir())


def test_save_accepts_numpy_scalars_in_manifest(data, tmp_path):
    corpus, _ = data
    manifest = _manifest(dim=np.int64(D)) | {"count": np.int64(10)}
    out = save_index(tmp_path / "idx", build_index(corpus[:10]), np.arange(10), manifest)
    _, ids, loaded = load_index(out, expected_dim=D)
    assert ids == list(range(10)) and loaded["dim"] == D and loaded["count"] == 10


def test_recall_of_exact_is_the_overlap_with_brute_force():
    # IVF with 1 of 32 lists scanned misses true neighbours: recall_of_exact is the mean overlap with the exact top k.
    rng = np.random.default_rng(1)
    corpus, queries = normalize(rng.standard_normal((2000, D))), normalize(rng.standard_normal((Q, D)))
    metrics, ann_ids = ann_report(corpus, queries, K, "IVF32,Flat", nprobe=1)
    exact = brute_force(corpus, queries, K)[1]
    want = np.mean([len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ann_ids, exact)]) / K
    assert want < 0.8  # the ANN really is approximate here
    assert metrics["IVF32,Flat/recall_of_exact@10"] == pytest.approx(want)


def test_load_rejects_ids_that_do_not_match_the_index(data, tmp_path):
    corpus, _ = data
    out = save_index(tmp_path / "idx", build_index(corpus[:10]), np.arange(10), _manifest())
    (out / "ids.json").write_text(json.dumps([0, 1]))
    with pytest.raises(ValueError, match="has 2 ids for 10 vectors"):
        load_index(out)
