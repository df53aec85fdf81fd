"""benchmarks/bench_encode_host.py with a tiny random BERT: both sides run with the transformer's
forward replaced (zero vectors out), and the tokenizer comparison checks the ids are the same."""

import json
import sys


def test_bench_encode_host_times_both_sides_without_model_work(benchmark_script, tiny_bert_dir, tmp_path, monkeypatch, capsys):
    from embedft_testing.synthetic import random_like, save_as_sentence_transformer

    model = save_as_sentence_transformer(random_like(tiny_bert_dir, tmp_path / "m"))
    bench = benchmark_script("bench_encode_host")
    monkeypatch.setattr(sys, "argv", ["bench_encode_host.py", "--model", str(model), "--limit", "40", "--repeats", "2",
                                      "--batch-size", "8", "--data", "sample"])
    bench.main()
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["texts"] == 40 and "speed-up" in out and "(same ids)" in out
    assert set(result["host_seconds"]) == {"SentenceTransformer.encode", "embedft Encoder.encode"}
    assert all(t > 0 for t in result["host_seconds"].values()) and result["host_ratio"] > 0
    # The model did no work on either side: every vector is the pooled zeros, normalised.
    assert result["max_abs_vector"] == {"SentenceTransformer.encode": 0.0, "embedft Encoder.encode": 0.0}
