"""benchmarks/bench_train.py on the sample data with a tiny random BERT: both sides train on
the same batches in the same order, and report finite losses, throughput and a recall."""

import math

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("bench_train")


@pytest.fixture(scope="module")
def settings(bench, tiny_bert_dir):
    return bench.BenchSettings(model=str(tiny_bert_dir), steps=3, batch_size=8, warmup_steps=1, limit_queries=50,
                               data="sample", device="cpu")


@pytest.fixture(scope="module")
def data(bench, settings):
    return bench.prepare_data(settings)


def test_pairs_are_embedft_batches_in_order(bench, settings, data):
    from embedft.data.batches import epoch_batches

    want = [b for _, b in zip(range(3), epoch_batches(data.src, 8, settings.seed, 0))]
    assert data.anchors == [data.src.texts[i] for b in want for i in b.anchors.tolist()]
    assert data.positives == [data.src.texts[i] for b in want for i in b.positives.tolist()]
    # Longer than an epoch: epoch 1 follows epoch 0, as in train().
    per_epoch = data.src.n_anchors // 8
    batches = bench.planned_batches(data.src, 8, per_epoch + 2, settings.seed)
    epoch1 = next(iter(epoch_batches(data.src, 8, settings.seed, 1)))
    assert (batches[per_epoch].anchors == epoch1.anchors).all()


@pytest.mark.slow
def test_st_dataloader_keeps_the_planned_order(bench, settings, data, tmp_path):
    import torch

    model = bench.load_st_model(settings, torch.device("cpu"))
    trainer = bench.build_st_trainer(model, settings, data, str(tmp_path), torch.device("cpu"))
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == settings.steps
    for i, batch in enumerate(batches):
        rows = slice(i * 8, (i + 1) * 8)
        for col, texts in (("anchor", data.anchors[rows]), ("positive", data.positives[rows])):
            want = model.tokenizer(texts, padding=True, truncation=True, max_length=model.max_seq_length,
                                   return_tensors="pt")["input_ids"]
            assert torch.equal(batch[f"{col}_input_ids"].cpu(), want), (i, col)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.slow
def test_both_sides_train_and_report(bench, settings, data):
    results = {side: bench.run_side(side, settings, data) for side in ("st", "embedft")}
    st, ours = results["st"], results["embedft"]
    for r in (st, ours):
        assert r["steps"] == 3 and r["pairs"] == 24
        assert math.isfinite(r["first_loss"]) and math.isfinite(r["final_loss"]) and r["final_loss"] > 0
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["step_samples_per_s"] > 0
        assert 0.0 <= r["recall@10"] <= r["r_cap@10"] <= 1.0
        assert r["peak_rss_mb"] > 0 and r["queries"] == 50
    assert st["pairs_digest"] == ours["pairs_digest"] and st["tokens"] == ours["tokens"]
    assert st["trainable_params"] == ours["trainable_params"]  # same LoRA on both sides
    # LoRA B starts at zero and the tiny model has no dropout, so step 1 is the base model on the
    # same batch: with no same-product pair in it, InfoNCE at 0.05 and MNRL at scale 20 agree.
    assert data.same_product_pairs_per_batch == 0.0
    assert st["first_loss"] == pytest.approx(ours["first_loss"], abs=1e-4)

    ratios = bench.compare(results)
    assert ratios["samples_per_s"] == pytest.approx(ours["samples_per_s"] / st["samples_per_s"])
    table = bench.format_table(results, ratios)
    assert "sentence-transformers" in table and "recall@10" in table and "R_cap@10" in table and "x" in table.splitlines()[2]


def test_data_takes_a_path_in_pricerunners_layout(bench, tmp_path):
    csv = tmp_path / "offers.csv"
    csv.write_text("1,apple iphone 8 64gb,1,10,1,Apple,Mobile Phones\n2,iphone 8 64 gb silver,1,10,1,Apple,Mobile Phones\n")
    cfg = bench.data_config(str(csv))
    assert cfg.train == str(csv) and cfg.text_column == 1 and cfg.group_column == 3 and not cfg.header
    assert bench.data_config("sample").train == str(bench.SAMPLE)
    with pytest.raises(FileNotFoundError, match=r"--data .*missing\.csv not found; use --data sample"):
        bench.data_config(str(tmp_path / "missing.csv"))
