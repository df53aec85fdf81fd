"""Per-epoch retrieval validation on grouped data: without a query instruction every query is scored from the
corpus's own vectors (no query encoded, `train.val_max_queries` not a cap), with the recall that encoding the
queries gives (and R_cap@10 beside it); with an instruction the queries are encoded in their own form and
capped."""

import numpy as np
import pytest
import torch
from test_train import _encoder, toy_examples  # tests/training is on sys.path (rootdir imports)

from embedft.data.examples import Examples, retrieval_task
from embedft.evaluation.index import exact_search
from embedft.evaluation.metrics import mrr_at_k, ndcg_at_k, r_cap_at_k, recall_at_k
from embedft.training.validation import build_val_set, validate

CPU = torch.device("cpu")


def _recall_encoding_the_queries(enc, task, k=10, metric=recall_at_k):
    q = enc.encode_ids(enc.tokenize(task.queries, is_query=True), device=CPU)
    c = enc.encode_ids(enc.tokenize(task.corpus), device=CPU)
    _, ranked = exact_search(c, q, k, self_ids=task.self_ids)
    return metric(ranked, task.positives, k)


def test_without_a_query_instruction_every_query_is_scored_from_the_corpus_vectors(tiny_bert_dir, monkeypatch):
    enc = _encoder(tiny_bert_dir).eval()
    assert not enc.spec.query_template
    fit, val_ex = toy_examples(4, 4), toy_examples(10, 3)
    val = build_val_set(enc, fit, val_ex, 5, 100, 10, 0)  # max_queries 5 of the 30 queries
    task = retrieval_task(val_ex)
    assert len(task) == 30 and len(val.query_ids) == 30
    assert val.queries_in_corpus
    np.testing.assert_array_equal(val.self_ids, task.self_ids)
    assert val.query_ids == enc.tokenize(task.queries, is_query=True)
    encoded = []
    real = enc.encode_ids
    monkeypatch.setattr(enc, "encode_ids", lambda ids, **kw: encoded.append(len(ids)) or real(ids, **kw))
    out = validate(enc, val, None, None, 8, CPU, 0)
    got = out["val/recall@10"]
    assert encoded == [len(task.corpus)]  # the corpus only
    assert got == pytest.approx(_recall_encoding_the_queries(enc, task), abs=1e-9)
    assert 0 < got < 1
    assert out["val/r_cap@10"] == pytest.approx(_recall_encoding_the_queries(enc, task, metric=r_cap_at_k), abs=1e-9)
    assert out["val/mrr@10"] == pytest.approx(_recall_encoding_the_queries(enc, task, metric=mrr_at_k), abs=1e-9)
    assert 0 < out["val/mrr@10"] < 1
    assert out["val/ndcg@10"] == pytest.approx(_recall_encoding_the_queries(enc, task, metric=ndcg_at_k), abs=1e-9)


def test_r_cap_is_logged_beside_standard_recall_and_differs_past_k_positives(tiny_bert_dir):
    """Queries with 14 positives: standard recall@10 cannot pass 10/14, R_cap@10 (the evaluation's figure) can."""
    enc = _encoder(tiny_bert_dir).eval()
    val_ex = toy_examples(2, 15)
    val = build_val_set(enc, toy_examples(4, 4), val_ex, 100, 100, 10, 0)
    out = validate(enc, val, None, None, 8, CPU, 0)
    task = retrieval_task(val_ex)
    assert out["val/recall@10"] == pytest.approx(_recall_encoding_the_queries(enc, task), abs=1e-9)
    assert out["val/r_cap@10"] == pytest.approx(_recall_encoding_the_queries(enc, task, metric=r_cap_at_k), abs=1e-9)
    assert out["val/recall@10"] <= 10 / 14 + 1e-9 < out["val/r_cap@10"]


def test_with_a_query_instruction_queries_are_encoded_in_their_form_and_capped(tiny_qwen3_dir):
    enc = _encoder(tiny_qwen3_dir, query_instruction="Query: {text}").eval()
    fit, val_ex = toy_examples(4, 4), toy_examples(10, 3)
    val = build_val_set(enc, fit, val_ex, 5, 100, 10, 0)
    assert not val.queries_in_corpus and len(val.query_ids) == 5
    task = retrieval_task(val_ex, max_queries=5, seed=0)
    assert val.query_ids == enc.tokenize(task.queries, is_query=True) != enc.tokenize(task.queries)
    assert validate(enc, val, None, None, 8, CPU, 0)["val/recall@10"] == pytest.approx(
        _recall_encoding_the_queries(enc, task), abs=1e-9)


def _pairs(rows, source="pairs"):
    return Examples("pairs", source, np.arange(len(rows)) + 1, [q for q, _, _ in rows],
                    positives=[p for _, p, _ in rows], negatives=[[n] for _, _, n in rows])


def test_training_documents_join_the_validation_corpus_as_distractors(tiny_bert_dir):
    enc = _encoder(tiny_bert_dir).eval()
    val_ex = _pairs([("q1", "d1", "n1"), ("q1", "d2", ""), ("q2", "d3", "d1")])
    fit = _pairs([(f"t{i}", f"e{i}", f"m{i}") for i in range(30)] + [("t0", "d1", "")])  # d1: also a val document
    base = build_val_set(enc, fit, val_ex, 100, 100, 10, 0)
    own = ["d1", "d2", "d3", "n1"]
    assert [enc.tokenize([t])[0] for t in own] == base.corpus_ids
    val = build_val_set(enc, fit, val_ex, 100, 100, 10, 0, distractors=20)
    extra = val.corpus_ids[len(own):]
    assert val.corpus_ids[:len(own)] == base.corpus_ids and len(extra) == 20  # capped, after the val documents
    by_ids = {tuple(enc.tokenize([t])[0]): t for t in [f"e{i}" for i in range(30)] + [f"m{i}" for i in range(30)]}
    texts = [by_ids[tuple(ids)] for ids in extra]
    assert len(set(texts)) == 20  # training positives and negatives, each once, never a val document again
    assert [p.tolist() for p in val.positives] == [p.tolist() for p in base.positives]  # the judgements unchanged
    again = build_val_set(enc, fit, val_ex, 100, 100, 10, 0, distractors=20)
    assert again.corpus_ids == val.corpus_ids  # drawn by the seed
    assert len(build_val_set(enc, fit, val_ex, 100, 100, 10, 0, distractors=1000).corpus_ids) == len(own) + 60


def test_distractors_make_grouped_validation_search_more_and_keep_the_queries_rows(tiny_bert_dir):
    enc = _encoder(tiny_bert_dir).eval()
    fit, val_ex = toy_examples(12, 4), toy_examples(10, 3)
    fit = Examples("grouped", "toy", fit.rows, [f"fit {t}" for t in fit.texts], groups=[f"f{g}" for g in fit.groups])
    base = build_val_set(enc, fit, val_ex, 100, 100, 10, 0)
    val = build_val_set(enc, fit, val_ex, 100, 100, 10, 0, distractors=1000)
    assert val.queries_in_corpus and len(val.corpus_ids) == len(base.corpus_ids) + 48
    np.testing.assert_array_equal(val.self_ids, base.self_ids)
    assert val.query_ids == base.query_ids
    with_d, without = (validate(enc, v, None, None, 8, CPU, 0)["val/recall@10"] for v in (val, base))
    assert with_d <= without  # more documents to rank against the same positives
