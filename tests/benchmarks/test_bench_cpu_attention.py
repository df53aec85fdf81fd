"""benchmarks/bench_cpu_attention.py times both kernels for every shape, dtype and pass it lists."""

import json
import sys


def test_bench_cpu_attention_times_flash_and_math_for_each_case(benchmark_script, monkeypatch, capsys):
    bench = benchmark_script("bench_cpu_attention")
    monkeypatch.setattr(sys, "argv", ["bench_cpu_attention.py", "--batch", "4", "--lengths", "8,16", "--repeats", "1"])
    bench.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = result["rows"]
    assert len(rows) == len(bench.HEADS) * 2 * 2 * 2  # heads x lengths x dtypes x passes
    assert {(r["dtype"], r["pass"]) for r in rows} == {(d, p) for d in ("float32", "bfloat16") for p in ("fwd", "fwd+bwd")}
    assert all(r["flash_ms"] > 0 and r["math_ms"] > 0 for r in rows)
