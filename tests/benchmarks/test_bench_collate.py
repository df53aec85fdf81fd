"""benchmarks/bench_collate.py: the per-row reference and embedft's collate agree, and both are timed."""

import sys


def test_bench_collate_checks_equal_outputs_and_prints_a_row_per_shape(benchmark_script, tiny_qwen3_dir, monkeypatch,
                                                                        capsys):
    bench = benchmark_script("bench_collate")
    monkeypatch.setattr(sys, "argv", ["bench_collate.py", "--model", str(tiny_qwen3_dir), "--repeats", "2"])
    bench.main()
    out = capsys.readouterr().out
    assert "(left padding)" in out  # the decoder path, the one the old code and the new differ most in
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(bench.SHAPES) and all(float(r.split("|")[5].strip().rstrip("x")) > 0 for r in rows)
