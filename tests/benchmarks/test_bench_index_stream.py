"""benchmarks/bench_index_stream.py: each build in a process of its own, the streamed and the whole index alike."""

import pytest


@pytest.mark.slow  # three processes start torch and sentence-transformers
def test_bench_index_stream_measures_each_build_in_its_own_process(benchmark_script, tmp_path, capsys):
    bench = benchmark_script("bench_index_stream")
    corpus = bench.write_corpus(tmp_path / "c.csv", 450, block=100)
    lines = corpus.read_text().splitlines()
    assert lines[0] == "id,text" and len(lines) == 451 and len(set(lines)) == 451 and lines[-1].startswith("d449,")
    results = bench.main(["--rows", "300", "--in-memory-rows", "300", "--chunk-rows", "100"])
    assert [(r["rows"], r["path"]) for r in results] == [
        (1000, "baseline (1,000 rows, read whole)"), (300, "streamed, chunks of 100"),
        (300, "read whole (`--chunk-rows 0`)")]
    assert all(r["peak_mib"] > 100 and r["seconds"] > 0 for r in results)
    assert results[1]["index_mib"] == results[2]["index_mib"] > 0
    out = capsys.readouterr().out
    assert "| 300 | streamed, chunks of 100 |" in out  # the table the docs quote
