"""benchmarks/bench_identity_check.py times the digest, the stat check and a model load on a given folder."""

import sys


def test_bench_identity_check_prints_the_three_timings(benchmark_script, tiny_bert_dir, tmp_path, monkeypatch, capsys):
    from embedft_testing.synthetic import random_like, save_as_sentence_transformer

    model = save_as_sentence_transformer(random_like(tiny_bert_dir, tmp_path / "m"))
    bench = benchmark_script("bench_identity_check")
    monkeypatch.setattr(sys, "argv", ["bench_identity_check.py", "--model", str(model), "--repeats", "1"])
    bench.main()
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and line.split("|")[2].strip()[:1].isdigit()}
    assert len(rows) == 3 and all(v > 0 for v in rows.values())
