"""Per-epoch retrieval validation on grouped data: without a query instruction every query is scored from the
corpus's own vectors (no query encoded, `train.val_max_queries` not a cap), with the recall that encoding the
queries gives; with an instruction the queries are encoded in their own form and capped."""

import numpy as np
import pytest
import torch
from test_train import _encoder, toy_examples  # tests/training is on sys.path (rootdir imports)

from embedft.data.examples import retrieval_task
from embedft.evaluation.index import exact_search
from embedft.evaluation.metrics import recall_at_k
from embedft.training.validation import build_val_set, validate

CPU = torch.device("cpu")


def _recall_encoding_the_queries(enc, task, k=10):
    q = enc.encode_ids(enc.tokenize(task.queries, is_query=True), device=CPU)
    c = enc.encode_ids(enc.tokenize(task.corpus), device=CPU)
    _, ranked = exact_search(c, q, k, self_ids=task.self_ids)
    return recall_at_k(ranked, task.positives, k)


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
    got = validate(enc, val, None, None, 8, CPU, 0)["val/recall@10"]
    assert encoded == [len(task.corpus)]  # the corpus only
    assert got == pytest.approx(_recall_encoding_the_queries(enc, task), abs=1e-9)
    assert 0 < got < 1


def test_with_a_query_instruction_queries_are_encoded_in_their_form_and_capped(tiny_qwen3_dir):
    enc = _encoder(tiny_qwen3_dir, query_instruction="Query: {text}").eval()
    fit, val_ex = toy_examples(4, 4), toy_examples(10, 3)
    val = build_val_set(enc, fit, val_ex, 5, 100, 10, 0)
    assert not val.queries_in_corpus and len(val.query_ids) == 5
    task = retrieval_task(val_ex, max_queries=5, seed=0)
    assert val.query_ids == enc.tokenize(task.queries, is_query=True) != enc.tokenize(task.queries)
    assert validate(enc, val, None, None, 8, CPU, 0)["val/recall@10"] == pytest.approx(
        _recall_encoding_the_queries(enc, task), abs=1e-9)
