"""benchmarks/bench_serve.py's load generator and report against a live tiny server (the full
benchmark starts five MiniLM servers: `make bench-serve`, figures in docs/serving.md)."""

from __future__ import annotations

import asyncio

from serving.serve_helpers import TEXTS, LiveServer, engine_for


def test_load_sends_every_request_round_robin_and_batch_stats_read_the_passes(benchmark_script, family_models):
    bench = benchmark_script("bench_serve")
    server = LiveServer(engine_for(family_models["bert"], adapters=("a1", "a2")))
    try:
        before = bench.batch_stats(server.url)
        r = asyncio.run(bench.load([(server.url, "a1"), (server.url, "a2")], TEXTS * 3, clients=3, per_request=2,
                                   requests=12, max_seconds=120))
        stats = bench.batch_stats(server.url, since=before)
    finally:
        server.close()
    assert r["requests"] == 12 and r["failed"] == 0 and 0 < r["p50_ms"] <= r["p99_ms"]
    assert abs(r["texts_per_s"] - 2 * r["requests_per_s"]) <= 0.2  # 2 texts a request (both rounded to 0.1)
    m = server.engine.metrics
    # 6 warm-up requests and 12 measured ones, alternating between the two adapters, 2 texts each.
    assert m.value("rows_total", model="a1") == m.value("rows_total", model="a2") == 18
    assert stats["rows_per_pass"] >= 1 and 1 <= stats["models_per_pass"] <= 2
    report = {"results": {"multi-4": {**r, **stats, "peak_rss_mb": 1}}}
    lines = bench.table(report).splitlines()
    assert lines[0].startswith("| scenario | texts_per_s") and lines[2].startswith("| multi-4 | ")
