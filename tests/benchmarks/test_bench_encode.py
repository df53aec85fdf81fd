"""benchmarks/bench_encode.py with a tiny random BERT: both sides embed the same texts to the
same vectors at fp32, --precisions bf16 times the bf16 path with its difference reported, and
--profile says where each side's time went; forward calls are counted per side."""

import json
import sys


def test_bench_encode_reports_each_precision_against_sentence_transformers(benchmark_script, tiny_bert_dir, tmp_path,
                                                                           monkeypatch, capsys):
    from embedft_testing.synthetic import random_like, save_as_sentence_transformer

    model = save_as_sentence_transformer(random_like(tiny_bert_dir, tmp_path / "m"))
    bench = benchmark_script("bench_encode")
    monkeypatch.setattr(sys, "argv", ["bench_encode.py", "--model", str(model), "--limit", "40", "--repeats", "1",
                                      "--batch-size", "8", "--precisions", "auto,bf16", "--deploy", "--row-capped",
                                      "--profile", "16"])
    bench.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["texts"] == 40 and result["embedft_precision"] == "auto"
    auto, bf16 = result["precisions"]["auto"], result["precisions"]["bf16"]
    assert auto["max_abs_diff"] == result["max_abs_diff"] <= 1e-5  # fp32 on CPU: ST's vectors
    assert 0 < bf16["max_abs_diff"] < 0.05  # bf16 rounds, and says by how much
    assert auto["texts_per_s"] > 0 and bf16["texts_per_s"] > 0
    assert result["deploy"]["max_abs_diff"] <= 1e-5 and result["deploy"]["texts_per_s"] > 0
    assert result["row_capped"]["max_abs_diff"] <= 1e-5 and result["row_capped"]["texts_per_s"] > 0
    calls = result["forward_calls"]  # per encode of the 40 texts: ST one call per 8, embedft per length chunk
    assert set(calls) == {"st", "auto", "bf16", "row_capped", "deploy"} and calls["st"] == 5
    assert calls["auto"] == calls["row_capped"] >= 5  # the same batching on the CPU
    profile = result["profile"]  # one profiled encode of the first 16 texts per side
    assert profile["texts"] == 16 and set(profile) == {"texts", "sentence-transformers", "embedft (auto)"}
    for side in ("sentence-transformers", "embedft (auto)"):
        assert profile[side]["wall_s"] > 0 and profile[side]["kind_shares"]["matmul"] > 0
        assert any(t["name"] == "aten::addmm" for t in profile[side]["top"])  # BERT's linear layers
