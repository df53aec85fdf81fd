"""benchmarks/bench_mining.py: its planted labels mix or gather as --spread says, and every anchor of a gathered
label still gets a negative of another label."""


def test_gathered_labels_still_get_negatives(benchmark_script):
    bench = benchmark_script("bench_mining")
    row = bench.mine_once(600, 3, spread=5.0, dim=16)
    assert (row["texts"], row["labels"], row["without_negative"]) == (600, 3, 0)
    assert row["seconds"] >= 0
