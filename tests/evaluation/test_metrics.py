import json
import math
import subprocess
import sys

import numpy as np
import pytest

from embedft.evaluation.metrics import (
    accuracy,
    classification_metrics,
    classification_report,
    confusion_matrix,
    knn_predict,
    knn_vote,
    macro_f1,
    mrr_at_k,
    ndcg_at_k,
    per_class_prf,
    r_cap_at_k,
    recall_at_k,
    retrieval_metrics,
)

# Two queries; -1 is padding.
RANKED = np.array([[3, 1, 7, -1], [0, 2, 4, 5]])
POSITIVES = [{1, 9}, np.array([5])]


def test_import_stays_light():
    code = "import sys, embedft.evaluation.metrics; assert 'faiss' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "k, expected",
    [
        # q0 top1 {3}: 0/2; q1 top1 {0}: 0/1  -> 0
        (1, 0.0),
        # q0 {3,1}: 1/2=0.5; q1 {0,2}: 0/1=0  -> 0.25
        (2, 0.25),
        # q0 {3,1,7}: 1/2=0.5; q1 {0,2,4,5}: 1/1=1  -> 0.75
        (4, 0.75),
    ],
)
def test_recall_at_k_by_hand(k, expected):
    assert recall_at_k(RANKED, POSITIVES, k) == pytest.approx(expected)


def test_recall_denominator_is_all_positives_and_r_cap_caps_it_at_k():
    # 3 positives, k=2, both retrieved: recall 2/3 (standard); R_cap 2 / min(3, 2) = 1.0
    assert recall_at_k(np.array([[4, 5, 6]]), [{4, 5, 6}], 2) == pytest.approx(2 / 3)
    assert r_cap_at_k(np.array([[4, 5, 6]]), [{4, 5, 6}], 2) == pytest.approx(1.0)
    # with no more positives than k the two agree: q0 1/2, q1 1/1
    assert r_cap_at_k(RANKED, POSITIVES, 4) == pytest.approx(recall_at_k(RANKED, POSITIVES, 4)) == pytest.approx(0.75)
    # k=1: q0 has 2 positives, none at rank 1 -> 0/min(2,1); q1 0/1
    assert r_cap_at_k(RANKED, POSITIVES, 1) == pytest.approx(0.0)


def test_recall_counts_a_repeated_id_once():
    # top2 = {1, 1} ∩ {1, 2} = {1}: 1 / 2 = 0.5 (and R_cap 1 / min(2, 2))
    assert recall_at_k(np.array([[1, 1]]), [{1, 2}], 2) == pytest.approx(0.5)
    assert r_cap_at_k(np.array([[1, 1]]), [{1, 2}], 2) == pytest.approx(0.5)


def test_mrr_at_k_by_hand():
    # q0 first positive at rank 2 -> 1/2; q1 at rank 4 -> 1/4; mean 0.375
    assert mrr_at_k(RANKED, POSITIVES, 4) == pytest.approx(0.375)
    # k=2: q0 1/2, q1 none -> 0; mean 0.25
    assert mrr_at_k(RANKED, POSITIVES, 2) == pytest.approx(0.25)


def test_ndcg_at_k_by_hand():
    # q0: DCG = 1/log2(3); ideal has min(2,4)=2 ones: 1 + 1/log2(3)
    q0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))  # ~0.38685
    # q1: DCG = 1/log2(5) (rank 4); ideal = 1
    q1 = 1 / math.log2(5)  # ~0.43068
    assert ndcg_at_k(RANKED, POSITIVES, 4) == pytest.approx((q0 + q1) / 2)
    # perfect ranking -> 1
    assert ndcg_at_k(np.array([[2, 1, 0]]), [{1, 2}], 3) == pytest.approx(1.0)


def test_ndcg_with_more_positives_than_k():
    # 4 positives, k=2: the ideal DCG has min(4, 2) = 2 ones, so two hits on top score 1 (not an IndexError).
    assert ndcg_at_k(np.array([[0, 1, 2]]), [{0, 1, 2, 3}], 2) == pytest.approx(1.0)
    # one hit at rank 2: (1/log2(3)) / (1 + 1/log2(3))
    expected = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(np.array([[5, 0, 1]]), [{0, 1, 2, 3}], 2) == pytest.approx(expected)


def test_queries_without_positives_are_an_error():
    with pytest.raises(ValueError, match="1 of 2 queries have no positives"):
        recall_at_k(RANKED, [{1}, set()], 2)


def test_k_larger_than_ranked_is_an_error():
    with pytest.raises(ValueError, match="k=5 is larger than the 4 ranked results"):
        recall_at_k(RANKED, POSITIVES, 5)


def test_retrieval_metrics_keys_and_values():
    ranked = np.tile(np.arange(10), (2, 1))
    # q0 positive at rank 1, q1 positive at rank 3
    out = retrieval_metrics(ranked, [{0}, {2}], ks=(1, 5), prefix="val/")
    assert list(out) == ["val/recall@1", "val/recall@5", "val/r_cap@1", "val/r_cap@5", "val/mrr@10", "val/ndcg@10",
                         "val/n_queries"]
    assert out["val/recall@1"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert out["val/recall@5"] == pytest.approx(1.0)
    assert out["val/r_cap@1"] == pytest.approx(0.5)  # one positive each: R_cap equals recall
    assert out["val/mrr@10"] == pytest.approx((1 + 1 / 3) / 2)
    assert out["val/ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / 2)  # (1 + 0.5) / 2
    assert out["val/n_queries"] == 2.0
    assert all(isinstance(v, float) for v in out.values())


def test_knn_vote_weighted_and_unweighted():
    labels = np.array([[0, 1, 1]])
    scores = np.array([[0.9, 0.5, 0.3]])
    # weighted: class0 = 0.9, class1 = 0.5 + 0.3 = 0.8 -> 0
    assert knn_vote(labels, scores, 2).tolist() == [0]
    # unweighted: class0 = 1 vote, class1 = 2 votes -> 1
    assert knn_vote(labels, scores, 2, weighted=False).tolist() == [1]


def test_knn_vote_ties_go_to_the_nearest_neighbour():
    # weighted: class1 = 0.5, class0 = 0.25 + 0.25 = 0.5 -> tie, nearest is class1
    assert knn_vote(np.array([[1, 0, 0]]), np.array([[0.5, 0.25, 0.25]]), 2).tolist() == [1]
    # unweighted: 2 vs 2 -> tie, nearest is class1
    assert knn_vote(np.array([[1, 0, 0, 1]]), np.ones((1, 4)), 2, weighted=False).tolist() == [1]
    # counts: class0 = 2, class1 = 2, class2 = 1; nearest is class2 (not tied),
    # so the nearest neighbour among the tied classes (column 1 -> class0) wins
    assert knn_vote(np.array([[2, 0, 1, 0, 1]]), np.ones((1, 5)), 3, weighted=False).tolist() == [0]


def test_knn_vote_padding_and_negative_scores():
    pad = np.finfo(np.float32).min  # what faiss returns next to id -1
    labels = np.array([[1, -1], [-1, -1], [0, 1]])
    scores = np.array([[0.2, pad], [pad, pad], [-0.1, -0.2]])
    # row0: only class1 voted; row1: no neighbours -> -1;
    # row2: class0 = -0.1 > class1 = -0.2, and unvoted class2 (sum 0) must not win
    assert knn_vote(labels, scores, 3).tolist() == [1, -1, 0]
    # The winner here is not the nearest neighbour: class0 = -0.1 + -0.1 = -0.2 beats class1 = -0.3,
    # while the unvoted class2 (sum 0) would beat both and leave no tied candidate.
    assert knn_vote(np.array([[1, 0, 0]]), np.array([[-0.3, -0.1, -0.1]]), 3).tolist() == [0]


def test_knn_vote_sums_equal_up_to_rounding_are_a_tie():
    # class0 = 0.1 + 0.2 = 0.30000000000000004 and class1 = 0.3: a tie, so the nearest (class1) wins
    assert 0.1 + 0.2 != 0.3
    assert knn_vote(np.array([[1, 0, 0]]), np.array([[0.3, 0.1, 0.2]]), 2).tolist() == [1]


def test_knn_vote_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        knn_vote(np.array([[2]]), np.array([[1.0]]), 2)


def test_knn_predict_maps_index_rows_to_their_labels():
    pad = np.finfo(np.float32).min
    index_labels = np.array([2, 0, 0, 1])  # index row -> class id
    ids = np.array([[3, 1, 2], [0, -1, -1], [-1, -1, -1]])  # search result: row 3 (class 1), rows 1, 2 (class 0)
    scores = np.array([[0.9, 0.5, 0.5], [0.4, pad, pad], [pad, pad, pad]])
    # row0: class0 = 1.0 beats class1 = 0.9 (a vote on the row ids themselves would say 3); row1: class 2;
    # row2: padding only -> -1 (a clipped -1 read as row 0 would say class 2)
    assert knn_predict(index_labels, scores, ids, 3).tolist() == [0, 2, -1]
    assert knn_predict(index_labels, scores, ids, 3, weighted=False).tolist() == [0, 2, -1]


Y_TRUE = np.array([0, 0, 1, 1, 2])
Y_PRED = np.array([0, 1, 1, 1, 0])


def test_classification_by_hand():
    # 3 of 5 correct (idx 0, 2, 3)
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(0.6)
    prf = per_class_prf(Y_TRUE, Y_PRED, [0, 1, 2])
    # class0: tp=1, predicted 2, support 2 -> p=0.5, r=0.5, f1=0.5
    assert prf[0] == pytest.approx((0.5, 0.5, 0.5, 2))
    # class1: tp=2, predicted 3, support 2 -> p=2/3, r=1, f1=2*(2/3)/(5/3)=0.8
    assert prf[1] == pytest.approx((2 / 3, 1.0, 0.8, 2))
    # class2: never predicted -> p=0, r=0, f1=0, support 1
    assert prf[2] == pytest.approx((0.0, 0.0, 0.0, 1))
    # macro = (0.5 + 0.8 + 0) / 3; label 3 has no truth and no prediction -> skipped
    assert macro_f1(Y_TRUE, Y_PRED) == pytest.approx(1.3 / 3)
    assert macro_f1(Y_TRUE, Y_PRED, labels=[0, 1, 2, 3]) == pytest.approx(1.3 / 3)
    # rows = true: 0 -> {0: 1, 1: 1}; 1 -> {1: 2}; 2 -> {0: 1}
    assert confusion_matrix(Y_TRUE, Y_PRED, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_confusion_matrix_leaves_out_no_prediction():
    # the -1 (no neighbours) sample is not counted: row 1 sums to 0, not 1
    assert confusion_matrix(np.array([0, 1]), np.array([0, -1]), 2).tolist() == [[1, 0], [0, 0]]
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        confusion_matrix(np.array([0, 2]), np.array([0, 0]), 2)


def test_classification_metrics_and_report():
    names = ["a", "b", "c"]
    out = classification_metrics(Y_TRUE, Y_PRED, names, prefix="test/")
    assert out == pytest.approx({"test/accuracy": 0.6, "test/macro_f1": 1.3 / 3})
    report = classification_report(Y_TRUE, Y_PRED, names)
    json.dumps(report)  # must be JSON-serialisable as is
    assert report["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def _trec_eval(ranked: np.ndarray, positives, measures: set[str]) -> dict[str, dict[str, float]]:
    """Per query, pytrec_eval's measures over `ranked` (best first, -1 padding left out)."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    qrels = {f"q{i}": {f"d{d}": 1 for d in pos} for i, pos in enumerate(positives)}
    # Strictly decreasing scores, so trec_eval's own tie-breaking never reorders the ranking.
    run = {f"q{i}": {f"d{d}": float(len(row) - j) for j, d in enumerate(row.tolist()) if d >= 0}
           for i, row in enumerate(ranked)}
    return pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)


def test_retrieval_metrics_agree_with_pytrec_eval():
    """recall@k, R_cap@k, MRR@10 and nDCG@10 against trec_eval on random rankings with 1-15 positives
    per query (many queries with more positives than k, where recall and R_cap differ), some padded."""
    rng = np.random.default_rng(29)
    n_queries, n_corpus, depth = 200, 60, 20
    ranked = np.stack([rng.permutation(n_corpus)[:depth] for _ in range(n_queries)])
    # FAISS pads a short result list at its end (a small corpus): some rows stop after 3-19 results.
    for i in rng.choice(n_queries, 20, replace=False):
        ranked[i, int(rng.integers(3, depth)):] = -1
    # Positives drawn partly from each ranking, so hits land at every rank.
    positives = []
    for row in ranked:
        n = int(rng.integers(1, 16))
        pool = np.unique(np.concatenate([row[row >= 0][rng.random(int((row >= 0).sum())) < 0.3],
                                         rng.integers(0, n_corpus, 8)]))
        positives.append(set(rng.choice(pool, size=min(n, len(pool)), replace=False).tolist()))
    ks = (1, 5, 10, 20)
    per_q = _trec_eval(ranked, positives, {"recall." + ",".join(map(str, ks)), "P." + ",".join(map(str, ks)),
                                           "ndcg_cut.10"})
    top10 = _trec_eval(ranked[:, :10], positives, {"recip_rank"})  # MRR@10: trec_eval's MRR over the top 10
    assert len(per_q) == n_queries
    n_pos = np.array([len(p) for p in positives])
    assert (n_pos > 10).sum() > 20  # the case where the two recalls part
    out = retrieval_metrics(ranked, positives, ks=ks)
    for k in ks:
        theirs = [per_q[f"q{i}"][f"recall_{k}"] for i in range(n_queries)]
        assert out[f"recall@{k}"] == pytest.approx(np.mean(theirs), abs=1e-9)
        # R_cap@k is recall@k for a query with at most k positives, else precision@k (hits / k).
        cap = [per_q[f"q{i}"][f"recall_{k}"] if n_pos[i] <= k else per_q[f"q{i}"][f"P_{k}"] for i in range(n_queries)]
        assert out[f"r_cap@{k}"] == pytest.approx(np.mean(cap), abs=1e-9)
    assert out["ndcg@10"] == pytest.approx(np.mean([per_q[f"q{i}"]["ndcg_cut_10"] for i in range(n_queries)]),
                                           abs=1e-9)
    assert out["mrr@10"] == pytest.approx(np.mean([top10[f"q{i}"]["recip_rank"] for i in range(n_queries)]),
                                          abs=1e-9)
    assert out["recall@10"] < out["r_cap@10"]


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="y_true has 2 labels but y_pred has 1"):
        accuracy(np.array([0, 1]), np.array([0]))


def test_classification_agrees_with_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, size=300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 5, size=300))
    labels = list(range(5))
    assert accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert macro_f1(y_true, y_pred) == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    np.testing.assert_array_equal(
        confusion_matrix(y_true, y_pred, 5), skm.confusion_matrix(y_true, y_pred, labels=labels)
    )
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    ours = per_class_prf(y_true, y_pred, labels)
    np.testing.assert_allclose([ours[c][:3] for c in labels], np.stack([p, r, f], axis=1))
    assert [ours[c][3] for c in labels] == s.tolist()
