"""benchmarks/batch_padding.py on the sample data with a tiny BERT's tokenizer: it counts every token
of an epoch's group batches once, padding only adds, and batches of one row per call pad nothing."""

import pytest


@pytest.fixture(scope="module")
def bp(benchmark_script):
    return benchmark_script("batch_padding")


def test_an_epoch_of_group_batches_counts_each_text_once(bp, tiny_bert_experiment):
    from embedft.config import load_config
    from embedft.data.batches import build_pair_source, group_keys
    from embedft.modeling.encoder import load_encoder
    from embedft.recipes.common import prepare_data

    r = bp.padding(str(tiny_bert_experiment))
    cfg = load_config(tiny_bert_experiment)
    src = build_pair_source(prepare_data(cfg).fit)
    in_groups = [int(i) for k in group_keys(src) for i in src.members[int(k)]]  # not single-offer products
    lengths = [len(t) for t in load_encoder(cfg.model).tokenize([src.texts[i] for i in in_groups])]
    # Group batches lay every text of a group once an epoch; only the ragged last batch (< batch_size texts)
    # is left out.
    assert sum(lengths) - cfg.train.batch_size * max(lengths) < r["real"] <= sum(lengths)
    assert r["padded"] >= r["real"] and r["ratio"] == pytest.approx(r["padded"] / r["real"])
    assert r["batches"] == len(in_groups) // cfg.train.batch_size and r["calls"] >= r["batches"]


def test_one_row_per_call_pads_nothing(bp, tiny_bert_experiment, monkeypatch):
    import embedft.training.step as step
    from embedft.config import load_config

    monkeypatch.setattr(step, "CPU_FORWARD_ROWS", 1)
    r = bp.padding(str(tiny_bert_experiment))
    assert r["padded"] == r["real"] and r["calls"] == r["batches"] * load_config(tiny_bert_experiment).train.batch_size
