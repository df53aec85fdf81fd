"""benchmarks/bench_collate.py: the per-row reference and embedft's collate agree, and both are timed."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_collate.py"


def test_bench_collate_checks_equal_outputs_and_prints_a_row_per_shape(tiny_qwen3_dir, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_collate", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["bench_collate.py", "--model", str(tiny_qwen3_dir), "--repeats", "2"])
    bench.main()
    out = capsys.readouterr().out
    assert "(left padding)" in out  # the decoder path, the one the old code and the new differ most in
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(bench.SHAPES) and all(float(r.split("|")[5].strip().rstrip("x")) > 0 for r in rows)
