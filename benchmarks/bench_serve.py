"""Serving: one base model with 4 LoRA adapters in one `embedft serve` vs merged exports, over HTTP.

    python benchmarks/bench_serve.py [--model minilm] [--clients 16] [--texts-per-request 4]
                                     [--requests 600] [--max-seconds 30] [--rounds 2] [--json FILE]

Everything runs on this machine: the servers bind 127.0.0.1 on free ports, and this script's
clients only talk to them. Each scenario sends at most --requests requests (after a warm-up of
2 x --clients) and stops after --max-seconds, whichever comes first. The servers all start
first and stay up (an idle server takes no CPU); the scenarios run one after the other,
--rounds times, and each scenario's best round is reported (every round is in --json). Every
server is stopped with SIGTERM at the end, and must exit 0.

Adapters: 4 LoRA adapters (r=16, alpha=32 on the family's Q/K/V, the default `lora:` config)
with random weights (lora_B ~ N(0, 0.02), seeds 1-4); throughput and memory do not depend on
the values. Each is merged with `embedft export` (parity-checked) for the merged scenarios.

Scenarios, each with --clients concurrent clients in a closed loop (a client sends its next
request when its last one is answered), --texts-per-request product titles from data/ each:

    multi-4     one server, the base + 4 adapters; requests round-robin over the 4 adapters
    multi-1     the same kind of server; every request to one adapter
    merged-1    one server of one merged export alone (no peft): the single-model reference
                (the other three merged servers idle)
    merged-4x4  four servers, one merged export each (4 processes on the same cores);
                requests round-robin over them (their RSS is summed)

Reported per scenario: texts/s, requests/s, latency p50/p99 of a request, failed requests,
peak RSS (VmHWM) of the server process(es), and for the adapter servers the mean rows and
served models per forward pass (from /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
ADAPTERS = ("a1", "a2", "a3", "a4")


def titles(limit: int = 1000) -> list[str]:
    with open(REPO / "data" / "products.csv", newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)][:limit]


def make_adapters(model: str, root: Path) -> dict[str, Path]:
    """4 adapters with random LoRA weights on `model`, saved as embedft saves a trained one."""
    import torch

    from embedft.config import LoraConfig, ModelConfig
    from embedft.modeling.builders import build_encoder
    from embedft.modeling.lora import save_adapter

    out = {}
    for seed, name in enumerate(ADAPTERS, start=1):
        torch.manual_seed(seed)
        enc = build_encoder(ModelConfig(name=model), "cpu", LoraConfig(r=16, alpha=32, dropout=0.0))
        with torch.no_grad():
            for n, p in enc.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        out[name] = save_adapter(enc, root / "adapters" / name)
    return out


def export_all(adapters: dict[str, Path], root: Path) -> dict[str, Path]:
    from embedft.config import ExportConfig
    from embedft.export.merge import export_merged

    out = {}
    for name, adapter in adapters.items():
        export_merged(adapter, root / "exports" / name, cfg=ExportConfig(n_probe=16))
        out[name] = root / "exports" / name
    return out


class Server:
    """`embedft serve` in its own process on 127.0.0.1, a free port."""

    def __init__(self, model: str, adapters: dict[str, Path] | None = None, base_name: str = "base"):
        cmd = [sys.executable, "-m", "embedft", "serve", "--model", str(model), "--base-name", base_name,
               "--port", "0"]
        for name, path in (adapters or {}).items():
            cmd += ["--adapter", f"{name}={path}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.url = None
        deadline = time.monotonic() + 300
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)
                break
            if time.monotonic() > deadline:
                break
        if self.url is None:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log[-30:]))
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def memory_mb(self) -> dict[str, float]:
        """Peak (VmHWM) and current (VmRSS) resident memory in MiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        get = lambda key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1)) / 1024  # noqa: E731
        return {"peak_rss_mb": get("VmHWM"), "rss_mb": get("VmRSS")}

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


async def load(targets: list[tuple[str, str]], texts: list[str], clients: int, per_request: int, requests: int,
               max_seconds: float) -> dict:
    """Closed-loop clients over (url, model) targets, round-robin; latency of every request after the warm-up."""
    import httpx2 as httpx

    latencies: list[float] = []
    failed = 0
    counter = 0

    async def one(client, i: int) -> float:
        url, model = targets[i % len(targets)]
        start = (i * per_request) % (len(texts) - per_request)
        body = {"model": model, "input": texts[start:start + per_request], "encoding_format": "base64"}
        t0 = time.perf_counter()
        r = await client.post(f"{url}/v1/embeddings", json=body)
        if r.status_code != 200 or len(r.json()["data"]) != per_request:
            raise RuntimeError(f"{r.status_code}: {r.text[:200]}")
        return time.perf_counter() - t0

    limits = httpx.Limits(max_connections=clients * len({u for u, _ in targets}), max_keepalive_connections=clients * 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(one(client, i) for i in range(2 * clients)))  # warm-up: connections, first shapes
        deadline = time.perf_counter() + max_seconds

        async def worker() -> None:
            nonlocal counter, failed
            while time.perf_counter() < deadline:
                i = counter
                if i >= requests:
                    return
                counter += 1
                try:
                    latencies.append(await one(client, i))
                except Exception:  # counted and reported: a benchmark of a failing server is not a result
                    failed += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    done = len(latencies)
    lat = sorted(latencies)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    return {"requests": done, "failed": failed, "seconds": round(elapsed, 2),
            "requests_per_s": round(done / elapsed, 1), "texts_per_s": round(done * per_request / elapsed, 1),
            "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1)}


def read_metrics(url: str) -> dict[str, float]:
    """The unlabelled series of a server's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def batch_stats(url: str, since: dict | None = None) -> dict[str, float]:
    """The batch counters of a server; with `since` (an earlier reading), the mean rows and served
    models per forward pass in between."""
    m = read_metrics(url)
    keys = ("embedft_batch_rows_count", "embedft_batch_rows_sum", "embedft_batch_models_sum")
    now = {k: m.get(k, 0.0) for k in keys}
    if since is None:
        return now
    d = {k: now[k] - since[k] for k in keys}
    n = d["embedft_batch_rows_count"] or 1
    return {"rows_per_pass": round(d["embedft_batch_rows_sum"] / n, 1),
            "models_per_pass": round(d["embedft_batch_models_sum"] / n, 2)}


def run(args) -> dict:
    texts = titles()
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    t0 = time.perf_counter()
    adapters = make_adapters(args.model, root)
    exports = export_all(adapters, root)
    print(f"4 adapters and their merged exports made in {time.perf_counter() - t0:.0f}s ({root})", flush=True)
    kw = dict(texts=texts, clients=args.clients, per_request=args.texts_per_request, requests=args.requests,
              max_seconds=args.max_seconds)
    # All servers start first and stay up; an idle one takes no CPU, so each scenario has the cores to
    # itself, and alternating the scenarios over rounds spreads the drift of a shared machine over all.
    multi = Server(args.model, adapters)
    merged = [Server(exports[a]) for a in ADAPTERS]
    scenarios = {
        "multi-4": ([multi], [(multi.url, a) for a in ADAPTERS]),
        "multi-1": ([multi], [(multi.url, "a1")]),
        "merged-1": ([merged[0]], [(merged[0].url, "base")]),
        "merged-4x4": (merged, [(x.url, "base") for x in merged]),
    }
    rounds: dict[str, list[dict]] = {name: [] for name in scenarios}
    load_before = os.getloadavg()  # the machine may be shared: say how busy it was
    try:
        for i in range(args.rounds):
            for name, (servers, targets) in scenarios.items():
                before = batch_stats(servers[0].url) if len(servers) == 1 else None
                r = asyncio.run(load(targets, **kw))
                if before is not None:
                    r.update(batch_stats(servers[0].url, since=before))
                rounds[name].append(r)
                print(f"round {i + 1} {name}: {r}", flush=True)
        memory = {name: [s.memory_mb() for s in servers] for name, (servers, _) in scenarios.items()}
    finally:
        codes = [s.stop() for s in [multi, *merged]]
    results = {}
    for name, rs in rounds.items():
        best = max(rs, key=lambda r: r["texts_per_s"])
        results[name] = {**best, "texts_per_s_rounds": [r["texts_per_s"] for r in rs],
                         "peak_rss_mb": round(sum(m["peak_rss_mb"] for m in memory[name])),
                         "rss_mb": round(sum(m["rss_mb"] for m in memory[name]))}
    ref = results["merged-1"]
    summary = {
        "multi4_vs_merged1_throughput": round(results["multi-4"]["texts_per_s"] / ref["texts_per_s"], 3),
        "multi4_vs_merged1_peak_rss": round(results["multi-4"]["peak_rss_mb"] / ref["peak_rss_mb"], 3),
        "multi4_vs_merged4x4_throughput": round(results["multi-4"]["texts_per_s"]
                                                / results["merged-4x4"]["texts_per_s"], 3),
        "multi4_vs_merged4x4_peak_rss": round(results["multi-4"]["peak_rss_mb"]
                                              / results["merged-4x4"]["peak_rss_mb"], 3),
        "server_exit_codes": codes,
        "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
        "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
    }
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "args": vars(args),
            "results": results, "summary": summary}


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads, " \
           f"Python {platform.python_version()}"


def table(report: dict) -> str:
    cols = ("texts_per_s", "requests_per_s", "p50_ms", "p99_ms", "failed", "peak_rss_mb", "rows_per_pass",
            "models_per_pass")
    lines = ["| scenario | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm", help="Base model (the packaged MiniLM by default, offline).")
    ap.add_argument("--clients", type=int, default=16, help="Concurrent clients (closed loop).")
    ap.add_argument("--texts-per-request", type=int, default=4)
    ap.add_argument("--requests", type=int, default=600, help="Requests per scenario at most (after the warm-up).")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="Each scenario's load stops after this long.")
    ap.add_argument("--rounds", type=int, default=2, help="Runs of every scenario, alternating; the best is reported.")
    ap.add_argument("--json", type=Path, help="Also write the report as JSON here.")
    args = ap.parse_args(argv)
    report = run(args)
    print(table(report))
    print(json.dumps(report["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
