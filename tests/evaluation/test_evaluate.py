"""Evaluation on fixed embeddings: the side-by-side report, kNN classification edge cases."""

import json

import numpy as np
import pytest

from embedft.config import EvalConfig
from embedft.data.examples import Examples, retrieval_task
from embedft.errors import EvalError
from embedft.evaluation.report import check_report_dir, compare, format_table, write_report
from embedft.evaluation.tasks import EvalOutput, check_tasks, evaluate_classification, evaluate_retrieval


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_knn_classification_counts_unseen_labels_as_errors():
    # Two well separated classes in the index; the eval set adds a label never seen in training.
    train = _unit(np.array([[1, 0.1], [1, -0.1], [0.1, 1], [-0.1, 1]], dtype=np.float32))
    test = _unit(np.array([[1, 0.05], [0.05, 1], [1, 0.0]], dtype=np.float32))
    out = evaluate_classification(train, ["a", "a", "b", "b"], test, ["a", "b", "c"], k=2)
    m = out.metrics
    assert m["classification/unseen_label_queries"] == 1.0
    assert m["classification/accuracy"] == pytest.approx(2 / 3)
    # Per class F1: a: P=1/2 (the 'c' row is predicted a), R=1 -> 2/3; b: 1; c: 0 -> macro = (2/3 + 1 + 0) / 3.
    assert m["classification/macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert out.details["unseen_labels"] == ["c"]
    assert np.array(out.details["report"]["confusion_matrix"]).sum() == 3


def test_knn_k_larger_than_index_is_a_clear_error():
    x = _unit(np.eye(3, dtype=np.float32))
    with pytest.raises(EvalError, match="eval.knn_k=5 is larger than the 3 training texts"):
        evaluate_classification(x, ["a", "b", "c"], x, ["a", "b", "c"], k=5)


def test_check_tasks_refuses_what_the_splits_cannot_evaluate_before_any_encoding():
    train = Examples("grouped", "t.csv", np.arange(4) + 2, ["a1", "a2", "b1", "b2"], groups=["a", "a", "b", "b"],
                     labels=["x", "x", "y", "y"])
    ok = Examples("grouped", "t.csv", np.arange(2) + 2, ["c1", "c2"], groups=["c", "c"], labels=["x", "x"])
    check_tasks(EvalConfig(knn_k=4), train, ok)
    with pytest.raises(EvalError, match=r"eval.knn_k=5 is larger than the 4 training texts in the kNN index; "
                                        r"lower it \(-o eval.knn_k=4\)"):
        check_tasks(EvalConfig(knn_k=5), train, ok)
    singletons = Examples("grouped", "e.csv", np.arange(2) + 2, ["c1", "d1"], groups=["c", "d"], labels=["x", "y"])
    with pytest.raises(EvalError, match=r"e\.csv: the eval split has no retrieval query"):
        check_tasks(EvalConfig(knn_k=2), train, singletons)
    check_tasks(EvalConfig(knn_k=2, tasks=("classification",)), train, singletons)


def test_check_report_dir_refuses_a_file_or_a_folder_with_more_than_a_report(tmp_path):
    check_report_dir(tmp_path / "new")
    report = write_report(tmp_path / "old", None, EvalOutput({"retrieval/recall@1": 1.0}, {}), {})
    check_report_dir(report)  # an earlier report is replaced
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(EvalError, match="is a file; pass a folder"):
        check_report_dir(tmp_path / "afile")
    with pytest.raises(EvalError, match=r"holds files that are not an embedft report \(afile, old\)"):
        check_report_dir(tmp_path)


def test_retrieval_on_grouped_examples_excludes_self():
    ex = Examples("grouped", "t", np.arange(4) + 1, ["a1", "a2", "b1", "b2"], groups=["a", "a", "b", "b"])
    task = retrieval_task(ex)
    # a1 ~ a2 and b1 ~ b2; each item's nearest other item is its group mate.
    c = _unit(np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32))
    out = evaluate_retrieval(c[task.self_ids], c, task, ks=(1, 2))
    assert out.metrics["retrieval/recall@1"] == 1.0 and out.metrics["retrieval/mrr@10"] == 1.0
    assert out.details["n_queries"] == 4


def test_ann_index_faiss_cannot_train_is_an_eval_error():
    ex = Examples("grouped", "t", np.arange(4) + 1, ["a1", "a2", "b1", "b2"], groups=["a", "a", "b", "b"])
    task = retrieval_task(ex)
    c = _unit(np.random.default_rng(0).normal(size=(4, 16)))
    # 4096 PQ centroids cannot be trained on 4 vectors
    with pytest.raises(EvalError, match=r"eval.indexes \(--index\) 'PQ4x12': .*trains 4096 centroids"):
        evaluate_retrieval(c[task.self_ids], c, task, ks=(1,), indexes=("PQ4x12",))


def test_empty_corpus_is_a_clear_error():
    ex = Examples("grouped", "t", np.arange(2) + 1, ["a", "b"], groups=["a", "b"])  # no group has two items
    task = retrieval_task(ex)
    with pytest.raises(EvalError, match="empty"):
        evaluate_retrieval(np.zeros((0, 2), np.float32), np.zeros((2, 2), np.float32), task, ks=(1,))


def test_report_side_by_side_with_deltas(tmp_path):
    base = EvalOutput({"retrieval/recall@10": 0.5, "retrieval/seconds": 3.0}, {})
    adapted = EvalOutput({"retrieval/recall@10": 0.8, "retrieval/seconds": 2.0}, {"retrieval": {"n_queries": 7}})
    rows = compare(base.metrics, adapted.metrics)
    assert rows == [("retrieval/recall@10", 0.5, 0.8, pytest.approx(0.3))]  # timings are not quality rows
    table = format_table(rows)
    assert "0.5000" in table and "0.8000" in table and "+0.3000" in table
    out = write_report(tmp_path / "eval", base, adapted, {"name": "t", "model": "m"})
    payload = json.loads((out / "report.json").read_text())
    assert payload["base"]["retrieval/recall@10"] == 0.5 and payload["adapted"]["retrieval/recall@10"] == 0.8
    assert "| retrieval/recall@10 | 0.5000 | 0.8000 | +0.3000 |" in (out / "report.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]  # no temp folder left behind


def test_base_only_report_fills_the_base_column(tmp_path):
    base = EvalOutput({"retrieval/recall@10": 0.5, "retrieval/seconds": 3.0}, {"retrieval": {"n_queries": 7}})
    rows = compare(base.metrics, None)
    assert rows == [("retrieval/recall@10", 0.5, None, None)]
    out = write_report(tmp_path / "eval-base", base, None, {"name": "t", "model": "m"})
    payload = json.loads((out / "report.json").read_text())
    assert payload["base"]["retrieval/recall@10"] == 0.5 and payload["adapted"] is None
    assert "| retrieval/recall@10 | 0.5000 |  |  |" in (out / "report.md").read_text()


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_evaluate_encoder_encodes_at_eval_precision(tiny_bert_dir, precision):
    import torch

    from embedft.config import EvalConfig, ModelConfig
    from embedft.evaluation.tasks import evaluate_encoder
    from embedft.modeling.encoder import load_encoder

    enc = load_encoder(ModelConfig(name=str(tiny_bert_dir)))
    seen = []
    real_encode = enc.encode

    def spy(texts, **kw):
        seen.append((next(enc.parameters()).dtype, kw.get("amp")))
        return real_encode(texts, **kw)

    enc.encode = spy
    texts = [f"{w} {i}" for w in ("apple phone", "bosch washer", "sony tv") for i in range(4)]
    ex = Examples("grouped", "t", np.arange(len(texts)) + 1, texts, groups=[t.split()[0] for t in texts],
                  labels=[t.split()[1] for t in texts])
    out = evaluate_encoder(enc, ex, ex, EvalConfig(precision=precision, batch_size=4), device="cpu")
    want = {"auto": (torch.float32, None), "fp32": (torch.float32, False), "bf16": (torch.bfloat16, None)}[precision]
    assert seen and set(seen) == {want}
    assert 0 <= out.metrics["retrieval/recall@10"] <= 1 and "classification/macro_f1" in out.metrics
    assert all(p.dtype == torch.float32 for p in enc.parameters())  # the weights come back after encoding


def _clustered_grouped(n=300, per=3, noise=0.6, seed=0):
    # Groups of `per` texts whose embeddings scatter around one centre each.
    rng = np.random.default_rng(seed)
    ex = Examples("grouped", "t", np.arange(n) + 1, [f"t{i}" for i in range(n)],
                  groups=[f"g{i // per}" for i in range(n)])
    c = rng.standard_normal((n // per, 16))[np.arange(n) // per] + noise * rng.standard_normal((n, 16))
    return ex, _unit(c)


def test_ann_figures_are_the_ann_rankings_own():
    from embedft.evaluation.index import build_index, search_excluding_self
    from embedft.evaluation.metrics import retrieval_metrics

    ex, c = _clustered_grouped()
    task = retrieval_task(ex)
    with pytest.warns(UserWarning, match="clustering will be poor"):  # 300 vectors for 64 lists: approximate
        out = evaluate_retrieval(c[task.self_ids], c, task, ks=(1, 10), indexes=("IVF64,Flat",))
        index = build_index(c, "IVF64,Flat")  # the same deterministic k-means, nprobe 16 of 64
    m = out.metrics
    # The ANN's figures come from its own ranking, each query's own row excluded as for exact search.
    _, ann_ids = search_excluding_self(index, c[task.self_ids], 10, task.self_ids)
    want = retrieval_metrics(ann_ids, task.positives, ks=(1, 10))
    for key in ("recall@1", "recall@10", "r_cap@1", "r_cap@10", "mrr@10", "ndcg@10"):
        assert m[f"retrieval/IVF64,Flat/{key}"] == pytest.approx(want[key]), key
    assert m["retrieval/IVF64,Flat/recall@10"] != m["retrieval/recall@10"]  # the ANN does miss some
    assert out.details["recall_curve"] == {1: m["retrieval/recall@1"], 10: m["retrieval/recall@10"]}
    assert out.details["r_cap_curve"] == {1: m["retrieval/r_cap@1"], 10: m["retrieval/r_cap@10"]}


def test_knn_classification_follows_the_weighted_setting():
    # Query [1, 0]: its k=3 neighbours are one 'a' at cosine 1 and two 'b' at cosine 0.25 (the 'a' at -1 is not one).
    s = float(np.sqrt(1 - 0.25 ** 2))
    train = np.array([[1, 0], [0.25, s], [0.25, -s], [-1, 0]], dtype=np.float32)
    labels = ["a", "b", "b", "a"]
    test = np.array([[1, 0]], dtype=np.float32)
    weighted = evaluate_classification(train, labels, test, ["a"], k=3, weighted=True)  # a: 1 > b: 0.5
    assert weighted.metrics["classification/accuracy"] == 1.0
    unweighted = evaluate_classification(train, labels, test, ["a"], k=3, weighted=False)  # b: 2 votes > a: 1
    assert unweighted.metrics["classification/accuracy"] == 0.0
    assert unweighted.details["report"]["confusion_matrix"] == [[0, 1], [0, 0]]


def test_compare_leaves_out_timings_and_counts():
    m = {"retrieval/recall@10": 0.5, "retrieval/exact/qps": 900.0, "retrieval/HNSW32/qps": 2000.0,
         "retrieval/HNSW32/build_s": 0.2, "retrieval/n_queries": 40.0, "classification/unseen_label_queries": 1.0,
         "classification/seconds": 3.0, "classification/macro_f1": 0.7}
    assert [r[0] for r in compare(m, m)] == ["retrieval/recall@10", "classification/macro_f1"]


def test_a_task_the_splits_cannot_score_is_dropped_with_its_reason_in_the_log_and_the_report(tmp_path, caplog):
    from embedft.evaluation.tasks import dropped_tasks, tasks_for

    one_class = Examples("grouped", "t.csv", np.arange(4) + 2, ["a1", "a2", "b1", "b2"], groups=["a", "a", "b", "b"],
                         labels=["x", "x", "x", "x"])
    eval_ = Examples("grouped", "e.csv", np.arange(2) + 2, ["c1", "c2"], groups=["c", "c"], labels=["x", "x"])
    cfg = EvalConfig(knn_k=2)
    assert tasks_for(cfg, one_class, eval_) == ["retrieval"]
    why = dropped_tasks(cfg, one_class, eval_)["classification"]
    assert "train split has one ('x' in data.label_column)" in why and "1.0 whatever the model" in why
    with caplog.at_level("WARNING"):
        check_tasks(cfg, one_class, eval_)
    assert "eval.tasks: classification is not evaluated: it needs two or more classes" in caplog.text
    with pytest.raises(EvalError, match=r"none of eval.tasks=\['classification'\] fits grouped data: "
                                        r"classification needs two or more classes"):
        tasks_for(EvalConfig(knn_k=2, tasks=("classification",)), one_class, eval_)
    report = write_report(tmp_path / "r", None, EvalOutput({"retrieval/recall@1": 1.0}, {}),
                          {"dropped_tasks": dropped_tasks(cfg, one_class, eval_)})
    assert "Not evaluated: classification, which needs two or more classes" in (report / "report.md").read_text()
    assert json.loads((report / "report.json").read_text())["meta"]["dropped_tasks"] == {"classification": why}
