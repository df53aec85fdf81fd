"""`embedft serve` as a real process (SIGTERM drains and exits 0), its start-up refusals, and
adapters from MLflow: runs:/RUN_ID and registered model versions."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
from click.testing import CliRunner

from embedft.cli import main
from serving.serve_helpers import TEXTS, assert_close


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _queue_rows(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        line = next(x for x in r.read().decode().splitlines() if x.startswith("embedft_queue_rows "))
    return float(line.split()[1])


def test_sigterm_stops_taking_requests_finishes_the_one_in_flight_and_exits_0(family_models, tmp_path):
    fm = family_models["bert"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # A long batching window keeps the request queued (in flight) while the signal arrives.
    proc = subprocess.Popen([sys.executable, "-m", "embedft", "serve", "--model", str(fm["base"]), "--base-name", "base",
                             "--adapter", f"a1={fm['adapters']['a1']}", "--port", "0", "--max-wait-ms", "3000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    log: list[str] = []
    try:
        url = None
        for line in proc.stderr:  # ends if the process dies
            log.append(line)
            m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "".join(log)
        threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
        answer: dict = {}

        def request() -> None:
            answer["status"], answer["body"] = _post(f"{url}/v1/embeddings", {"model": "a1", "input": TEXTS})

        inflight = threading.Thread(target=request)
        inflight.start()
        for _ in range(600):  # until the server holds the request (a bounded wait, not a timing assertion)
            if _queue_rows(url) == len(TEXTS):
                break
            time.sleep(0.05)
        assert _queue_rows(url) == len(TEXTS)
        proc.send_signal(signal.SIGTERM)
        refused = False
        for _ in range(600):  # new connections are refused once the signal is handled
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
            except (urllib.error.URLError, ConnectionError):
                refused = True
                break
            time.sleep(0.05)
        inflight.join(120)
        assert proc.wait(120) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert refused
    assert answer["status"] == 200, answer
    got = np.array([d["embedding"] for d in answer["body"]["data"]], dtype=np.float32)
    assert_close(got, fm["refs"]["a1"]["document"])
    assert any("Finished server process" in line for line in log), "".join(log)


def test_serve_refuses_bad_adapters_before_serving(family_models, tmp_path, monkeypatch):
    fm = family_models["bert"]
    monkeypatch.chdir(tmp_path)  # no mlflow.db here
    runner = CliRunner()
    base = ["serve", "--model", str(fm["base"]), "--port", "0"]
    cases = [
        (["--adapter", "a1"], "write NAME=SOURCE"),
        (["--adapter", f"a1={fm['adapters']['a1']}", "--adapter", f"a1={fm['adapters']['a2']}"], "given twice"),
        (["--base-name", "a1", "--adapter", f"a1={fm['adapters']['a1']}"], "given twice"),
        (["--adapter", f"x={tmp_path / 'missing'}"], "no such folder"),
        (["--adapter", "x=runs:/0123456789abcdef"], "no MLflow database"),
        (["--adapter", "x=models:/faq"], "write models:/NAME/VERSION"),
        # An adapter trained on another base: refused at start with the reason.
        (["--adapter", f"q={family_models['qwen3']['adapters']['a1']}"], "was trained on base model"),
    ]
    for extra, message in cases:
        r = runner.invoke(main, base + extra)
        assert r.exit_code == 2 and message in r.output, (extra, r.output)
    r = runner.invoke(main, base + ["--max-queue", "8", "--max-inputs", "16"])
    assert r.exit_code == 2 and "max_queue_rows: must be >= max_inputs (16)" in r.output


def test_adapters_from_an_mlflow_run_and_a_registered_model_version(family_models, template_db, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from embedft.serving.app import build_engine
    from embedft.serving.config import ServeConfig
    from embedft.tracking import mlflow as tracking

    fm = family_models["bert"]
    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("t", artifact_location=tracking.artifact_location(uri, "t"))
    run_ids = {}
    for name in ("a1", "a2"):
        rid = client.create_run(exp, run_name=name).info.run_id
        client.log_artifacts(rid, str(fm["adapters"][name]), "adapter")
        client.set_terminated(rid, "FINISHED")
        run_ids[name] = rid
    client.create_registered_model("faq")
    client.create_model_version("faq", "file:///unused", run_id=run_ids["a2"])
    no_adapter = client.create_run(exp, run_name="register-only").info.run_id
    client.create_model_version("faq", "file:///unused", run_id=no_adapter)

    engine = build_engine(str(fm["base"]), [("r", f"runs:/{run_ids['a1']}"), ("m", "models:/faq/1")],
                          ServeConfig(), base_name="base")
    cards = {c["id"]: c for c in engine.models()}
    assert cards["r"]["source"] == f"runs:/{run_ids['a1']}" and cards["m"]["source"] == "models:/faq/1"
    with engine:
        assert_close(engine.embed("r", TEXTS, timeout=60).vectors, fm["refs"]["a1"]["document"])
        assert_close(engine.embed("m", TEXTS, timeout=60).vectors, fm["refs"]["a2"]["document"])
    runner = CliRunner()
    r = runner.invoke(main, ["serve", "--model", str(fm["base"]), "--adapter", "x=models:/faq/latest"])
    assert r.exit_code == 2 and f"models:/faq/latest links to MLflow run {no_adapter}" in r.output
    assert "has no adapter/ artifact" in r.output
    r = runner.invoke(main, ["serve", "--model", str(fm["base"]), "--adapter", "x=models:/faq/9"])
    assert r.exit_code == 2 and "models:/faq/9: not found in the model registry" in r.output
    r = runner.invoke(main, ["serve", "--model", str(fm["base"]), "--adapter", "x=runs:/0123456789abcdef0123"])
    assert r.exit_code == 2 and "MLflow run 0123456789abcdef0123 not found" in r.output
