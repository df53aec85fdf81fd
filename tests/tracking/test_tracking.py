"""Tracking against a local SQLite store, a real `mlflow server` (slow) that dies mid-run, and the plots."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from embedft.errors import TrackingError
from embedft.tracking import delivery, runs
from embedft.tracking import mlflow as tracking
from embedft.tracking.base import NullTracker
from embedft.tracking.mlflow import MlflowTracker as Tracker
from embedft.tracking.mlflow import metric_key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file path of a run, recursively."""
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


@pytest.fixture(scope="module")
def store(template_db, tmp_path_factory) -> str:
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    shutil.copy(template_db, db)
    return f"sqlite:///{db}"


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    d = tmp_path / "out" / "adapter"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    (d / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (d / "embedft_meta.json").write_text(json.dumps({"experiment": "t"}))
    return d


def _tracker(uri: str, tmp_path: Path, experiment: str, **kw) -> Tracker:
    kw = {"flush_interval": 0.05, "end_timeout": 1.0, "max_backoff": 0.2, **kw}
    return Tracker(uri, experiment, tmp_path / "out" / ".mlflow-pending", **kw)


def _log_everything(t: Tracker, adapter_dir: Path, steps: range) -> None:
    t.log_text("name: t\nlora:\n  r: 4\n", "config.yaml")
    t.log_input("t-train", "d1g35t0000000001", 120, str(adapter_dir / "embedft_meta.json"), "training")
    t.log_input("t-eval", "d1g35t0000000002", 30, "some/hub-dataset", "evaluation")
    for s in steps:
        t.log_metrics({"train/loss": 1.0 / (s + 1), "val/recall@10": s / 100}, step=s)
    t.log_artifacts(adapter_dir, "adapter")
    t.log_artifact(adapter_dir / "adapter_config.json", "plots")


PARAMS = {"model.name": "tiny", "lora.r": 4, "train.lr": 2e-4, "eval.ks": [1, 5, 10], "data.eval": None,
          "long": "x" * 7000}


# ---------------------------------------------------------------------------------------
# Local SQLite store


def test_run_is_logged_and_reads_back(store, tmp_path, adapter_dir):
    with _tracker(store, tmp_path, "roundtrip") as t:
        run_id = t.start_run("r1", PARAMS, {"embedft.family": "bert"})
        _log_everything(t, adapter_dir, range(30))
        assert t.flush(20)
    assert t.end() is True and t.pending == 0
    c = _client(store)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    p = run.data.params
    assert p["model.name"] == "tiny" and p["lora.r"] == "4" and p["train.lr"] == "0.0002"
    assert p["eval.ks"] == "[1, 5, 10]" and p["data.eval"] == "None"
    assert len(p["long"]) == tracking.MAX_PARAM_LEN and p["long"].endswith("...[truncated]")
    assert run.data.tags["embedft.family"] == "bert" and "mlflow.parentRunId" not in run.data.tags
    assert _history(c, run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(30)]
    assert _history(c, run_id, "val/recall_at_10") == [(s, s / 100) for s in range(30)]
    assert _artifacts(c, run_id) == {"config.yaml", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                                     "adapter/embedft_meta.json", "plots/adapter_config.json"}
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"t-train", "t-eval"}
    train = inputs["t-train"]
    assert train.dataset.digest == "d1g35t0000000001" and json.loads(train.dataset.profile) == {"num_rows": 120}
    assert json.loads(train.dataset.source) == {"uri": str((adapter_dir / "embedft_meta.json").resolve())}
    assert {tg.key: tg.value for tg in train.tags}["mlflow.data.context"] == "training"
    assert inputs["t-eval"].dataset.source_type == "external"
    # Artifacts sit next to the database, not in a ./mlruns of the working directory.
    db_dir = Path(store[len("sqlite:///"):]).parent
    assert (db_dir / "mlartifacts" / "roundtrip" / run_id / "artifacts" / "config.yaml").is_file()
    assert not (tmp_path / "out" / ".mlflow-pending").exists()


def test_nested_child_run_has_parent_tag(store, tmp_path):
    parent = _tracker(store, tmp_path, "sweep")
    pid = parent.start_run("sweep", {"sweep": "lora.r=4,8"}, {"embedft.sweep": "parent"})
    kids = []
    for r in (4, 8):
        child = _tracker(store, tmp_path, "sweep")
        kids.append(child.start_run(f"r{r}", {"lora.r": r}, {}, parent_run_id=pid))
        child.log_metrics({"adapted/retrieval/recall@10": r / 10}, step=1)
        assert child.end()
    assert parent.end()
    c = _client(store)
    exp = c.get_experiment_by_name("sweep")
    found = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{pid}'")
    assert sorted(r.info.run_id for r in found) == sorted(kids)
    assert all(c.get_run(k).data.params["lora.r"] in ("4", "8") for k in kids)
    assert {r["run_id"]: r["parent_run_id"] for r in runs.list_runs(store, "sweep")} == {pid: None, **{k: pid for k in kids}}


def test_run_names_are_unique_within_an_experiment(store, tmp_path):
    """Two trains of one experiment were both called `default`: the runs table could not tell them apart."""
    names = []
    for _ in range(3):
        with _tracker(store, tmp_path, "names") as t:
            t.start_run("default", {}, {})
            names.append(t.run_name)
    assert names == ["default", "default-2", "default-3"]
    c = _client(store)
    assert sorted(r.info.run_name for r in c.search_runs([t.experiment_id])) == names
    c.delete_run(c.search_runs([t.experiment_id], filter_string="attributes.run_name = 'default-3'")[0].info.run_id)
    # A deleted run keeps its name (it can be restored); a name with quotes and LIKE wildcards is matched exactly.
    for wanted, expected in (("default", "default-4"), ("it's 100%_done", "it's 100%_done"),
                             ("it's 100%_done", "it's 100%_done-2"), ("defaul", "defaul")):
        with _tracker(store, tmp_path, "names") as t:
            t.start_run(wanted, {}, {})
            assert t.run_name == expected
    with _tracker(store, tmp_path, "other-names") as t:  # another experiment has its own names
        t.start_run("default", {}, {})
        assert t.run_name == "default"


def test_runs_started_at_once_under_one_name_end_with_one_name_each(store, tmp_path, monkeypatch):
    """Two trainings started together both found `default` free and both became `default`: the run
    that took a name first keeps it and the other moves on, past names taken meanwhile."""
    from embedft.tracking import mlflow as M

    with _tracker(store, tmp_path, "race") as a:
        a.start_run("default", {}, {})
    c = _client(store)
    c.create_run(a.experiment_id, run_name="default-2")  # a third training took default-2 meanwhile
    # B looked before A and the third one created theirs: it sees `default`, then `default-2`, as free.
    stale = iter(["default", "default-2"])
    real = M.unique_run_name
    monkeypatch.setattr(M, "unique_run_name", lambda *args: next(stale, None) or real(*args))
    with _tracker(store, tmp_path, "race") as b:
        b.start_run("default", {}, {})
        assert b.run_name == "default-3"
    names = [r.info.run_name for r in c.search_runs([a.experiment_id], order_by=["attributes.start_time ASC"])]
    assert names == ["default", "default-2", "default-3"]
    # A, asking again, keeps its name: every run reaches the same verdict from the store.
    first = c.get_run(a.run_id)
    assert M.settle_run_name(c, a.experiment_id, first, "default") == "default"


def test_experiments_are_declared_model_training_with_the_key_figures_view(store, tmp_path):
    """The MLflow UI opened embedft's experiments on the GenAI overview and showed no metric column."""
    from embedft.tracking import ui as mlflow_ui

    c = _client(store)
    c.create_experiment("made-before")  # as an older embedft (or anyone) made it: no tags
    c.create_experiment("chosen-kind", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("made-now", "made-before", "chosen-kind"):
        with _tracker(store, tmp_path, name) as t:
            t.start_run("r", {}, {})
    tags = {name: c.get_experiment_by_name(name).tags for name in ("made-now", "made-before", "chosen-kind")}
    assert tags["made-now"]["mlflow.experimentKind"] == "custom_model_development"
    assert tags["made-before"]["mlflow.experimentKind"] == "custom_model_development"
    assert tags["chosen-kind"]["mlflow.experimentKind"] == "genai_development"  # a kind someone chose is kept
    for name in tags:  # the saved view the runs page lists under "Views", as MLflow's UI reads it
        envelope = json.loads(tags[name]["mlflow.sharedViewState.embedft-key-figures"])
        assert envelope["name"] == "embedft: key figures" and isinstance(envelope["createdAt"], int)
        state = json.loads(envelope["state"])
        assert state["selectedColumns"][:4] == ["metrics.`_key/recall_at_10`", "metrics.`_key/recall_at_10_gain`",
                                                "metrics.`_key/macro_f1`", "metrics.`_key/macro_f1_gain`"]
    url = mlflow_ui.runs_url("http://127.0.0.1:5000", "7")
    assert url == ("http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
                   "&viewStateShareKey=embedft-key-figures")


def test_final_metrics_add_gains_and_key_figures_and_best_picks_the_primary_one():
    from embedft.tracking import ui as mlflow_ui

    adapted = {"retrieval/recall@10": 0.75, "retrieval/mrr@10": 0.5, "retrieval/seconds": 2.0,
               "classification/macro_f1": 0.9, "classification/unseen_label_queries": 1.0}
    base = {"retrieval/recall@10": 0.5, "retrieval/mrr@10": 0.25, "retrieval/seconds": 1.0,
            "classification/macro_f1": 0.8, "classification/unseen_label_queries": 1.0}
    m = mlflow_ui.final_metrics(adapted, base)
    assert {k: v for k, v in m.items() if k.startswith("gain/")} == pytest.approx(
        {"gain/retrieval/recall@10": 0.25, "gain/retrieval/mrr@10": 0.25, "gain/classification/macro_f1": 0.1})
    assert {k: v for k, v in m.items() if k.startswith("_key/")} == pytest.approx(
        {"_key/recall@10": 0.75, "_key/recall@10_gain": 0.25, "_key/macro_f1": 0.9, "_key/macro_f1_gain": 0.1})
    assert m["adapted/retrieval/seconds"] == 2.0 and m["base/retrieval/seconds"] == 1.0
    assert mlflow_ui.final_metrics(adapted, None) == {**{f"adapted/{k}": v for k, v in adapted.items()},
                                                      "_key/recall@10": 0.75, "_key/macro_f1": 0.9}
    assert mlflow_ui.final_metrics(None, base) == {f"base/{k}": v for k, v in base.items()}  # --base-only
    # `_key/` sorts before every lower-case section name, so the MLflow UI shows it first.
    assert sorted(["adapted", "base", "data", "gain", "train", "val", "_key"])[0] == "_key"
    runs = [{"name": "a", "metrics": {"_key/recall@10": 0.5, "_key/macro_f1": 0.99}},
            {"name": "b", "metrics": {"_key/recall@10": 0.7, "_key/macro_f1": 0.1}},
            {"name": "c", "metrics": {"_key/recall@10": 0.7}}, {"name": "failed", "metrics": {}}]
    assert mlflow_ui.best(runs)["name"] == "b"  # recall@10 first; the first of a tie
    assert mlflow_ui.best([{"name": "x", "metrics": {"_key/macro_f1": 0.3}}, runs[1]])["name"] == "x"
    assert mlflow_ui.best(runs[3:]) is None


@pytest.mark.parametrize("error, status", [(ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_context_manager_ends_failed_on_exception(store, tmp_path, error, status):
    with pytest.raises(error):
        with _tracker(store, tmp_path, "ctx") as t:
            run_id = t.start_run("boom", {}, {})
            t.log_metrics({"train/loss": 1.0}, step=0)
            raise error("training blew up")
    c = _client(store)
    assert c.get_run(run_id).info.status == status
    assert _history(c, run_id, "train/loss") == [(0, 1.0)]


def test_bad_values_do_not_raise_or_block_others(store, tmp_path, caplog):
    t = _tracker(store, tmp_path, "bad")
    run_id = t.start_run("bad", {"lora.r": 4}, {})
    t.log_metrics({"train/loss": float("nan"), "note": "not a number", "retrieval/IVF256,Flat/recall@10": 0.5}, step=3)
    t.log_params({"lora.r": 8, "extra": "ok"})  # params cannot change: refused with a warning, not raised
    assert t.end()
    c = _client(store)
    run = c.get_run(run_id)
    assert run.data.params["lora.r"] == "4" and run.data.params["extra"] == "ok"
    assert math.isnan(run.data.metrics["train/loss"]) and "note" not in run.data.metrics
    assert run.data.metrics["retrieval/IVF256_Flat/recall_at_10"] == 0.5
    assert "not a number" in caplog.text and "cannot change" in caplog.text


def _flaky(fn, fail_before: bool, times: int):
    """Wrap a client method: raise a transient error `times` times, before or after doing the call."""
    from mlflow.exceptions import MlflowException

    state = {"left": times}

    def wrapped(*a, **kw):
        if state["left"] > 0:
            state["left"] -= 1
            if not fail_before:
                fn(*a, **kw)  # stored, but the response is "lost"
            raise MlflowException("connection reset by peer")
        return fn(*a, **kw)

    return wrapped


def _recording(fn, sent: list):
    """Wrap log_batch: note every metric point that reaches the store."""

    def wrapped(*a, metrics=(), **kw):
        fn(*a, metrics=metrics, **kw)
        sent.extend((m.key, m.step, m.timestamp, m.value) for m in metrics)

    return wrapped


@pytest.mark.parametrize("stored_before_failure", [False, True], ids=["request-failed", "response-lost"])
def test_failed_requests_are_retried_without_loss_or_duplicates(store, tmp_path, monkeypatch, stored_before_failure):
    t = _tracker(store, tmp_path, "flaky")
    run_id = t.start_run("flaky", {}, {})
    sent = []
    flaky = _flaky(_recording(t._client.log_batch, sent), fail_before=not stored_before_failure, times=2)
    monkeypatch.setattr(t._client, "log_batch", flaky)
    for s in range(20):
        t.log_metrics({"train/loss": 1.0 / (s + 1)}, step=s)
    assert t.flush(20)
    assert t.end()
    assert _history(_client(store), run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(20)]
    # SQLite drops an exact repeat itself; other stores would keep it, so it must not be sent again.
    assert sorted(s for _, s, _, _ in sent) == list(range(20))


def test_already_logged_matches_exact_points_only(store, tmp_path):
    t = _tracker(store, tmp_path, "dedupe")
    run_id = t.start_run("dedupe", {}, {})
    t.log_metrics({"train/loss": 0.5, "train/lr": float("nan")}, step=2)
    assert t.end()
    c = _client(store)
    (point,) = c.get_metric_history(run_id, "train/loss")
    ts = point.timestamp
    candidates = [{"key": "train/loss", "value": 0.5, "timestamp": ts, "step": 2},       # stored
                  {"key": "train/loss", "value": 0.5, "timestamp": ts + 1, "step": 2},   # a later point
                  {"key": "train/loss", "value": 0.5, "timestamp": ts, "step": 3},
                  {"key": "train/lr", "value": float("nan"), "timestamp": ts, "step": 2},  # stored NaN
                  {"key": "other", "value": 1.0, "timestamp": ts, "step": 2}]
    assert delivery._already_logged(c, run_id, candidates) == {0, 3}


def test_store_away_at_end_spools_then_sync_delivers(store, tmp_path, adapter_dir, monkeypatch):
    from mlflow.exceptions import MlflowException

    spool_root = tmp_path / "out" / ".mlflow-pending"
    t = _tracker(store, tmp_path, "spool")
    run_id = t.start_run("spool", {"lora.r": 4}, {})
    t.log_metrics({"train/loss": 1.0}, step=0)
    assert t.flush(10)

    def down(*a, **kw):
        raise MlflowException("connection refused")

    for name in ("log_batch", "log_text", "log_artifact", "log_artifacts", "log_inputs", "set_terminated",
                 "get_metric_history"):
        monkeypatch.setattr(t._client, name, down)
    _log_everything(t, adapter_dir, range(1, 10))
    t.log_text("# notes\n", "eval/notes.md")
    t0 = time.monotonic()
    assert t.end("FINISHED") is False
    assert time.monotonic() - t0 < 10
    spool = spool_root / run_id
    meta = json.loads((spool / "spool.json").read_text())
    assert meta["status"] == "FINISHED" and meta["run_id"] == run_id and meta["uri"] == store
    records = [json.loads(x) for x in (spool / "records.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if r["type"] == "metric") == sorted(list(range(1, 10)) * 2)
    assert {r["type"] for r in records} == {"metric", "input", "artifact"}  # text kept as a file artifact
    c = _client(store)
    assert c.get_run(run_id).info.status == "RUNNING"

    backup = tmp_path / "again" / ".mlflow-pending"
    shutil.copytree(spool_root, backup)
    n = tracking.sync_pending(spool_root)
    assert n == len(records)
    assert not spool_root.exists()
    from mlflow import MlflowClient

    sent = []
    monkeypatch.setattr(MlflowClient, "log_batch", _recording(MlflowClient.log_batch, sent))
    assert tracking.sync_pending(backup) == len(records)  # a second delivery adds nothing
    assert sent == []  # the points already stored are not sent again
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    loss = _history(c, run_id, "train/loss")
    assert loss == [(0, 1.0)] + [(s, 1.0 / (s + 1)) for s in range(1, 10)]
    assert _history(c, run_id, "val/recall_at_10") == [(s, s / 100) for s in range(1, 10)]
    assert {"config.yaml", "eval/notes.md", "adapter/adapter_model.safetensors",
            "plots/adapter_config.json"} <= _artifacts(c, run_id)
    assert len(run.inputs.dataset_inputs) == 2


def test_sync_reports_a_damaged_spool_and_still_delivers_the_others(store, tmp_path):
    c = _client(store)
    exp_id = c.create_experiment("damaged-spool")
    root = tmp_path / ".mlflow-pending"
    run_ids = {}
    for name in ("damaged", "good"):
        run_ids[name] = c.create_run(exp_id).info.run_id
        (root / name).mkdir(parents=True)
        (root / name / "spool.json").write_text(json.dumps({"run_id": run_ids[name], "uri": store, "status": "FINISHED"}))
        line = json.dumps({"type": "metric", "key": "train/loss", "value": 0.5, "timestamp": 1, "step": 3})
        # a kill while spooling leaves the last record cut short
        (root / name / "records.jsonl").write_text(line + "\n" + (line[:20] if name == "damaged" else line) + "\n")
    with pytest.raises(TrackingError, match=r"delivered 2 records, but 1 spooled run\(s\) are still pending: "
                                            r".*damaged \(damaged spool: JSONDecodeError: .*repair or delete"):
        tracking.sync_pending(root)
    assert c.get_run(run_ids["good"]).info.status == "FINISHED" and not (root / "good").exists()
    assert c.get_run(run_ids["damaged"]).info.status == "RUNNING" and (root / "damaged" / "records.jsonl").exists()


def test_sync_pending_names_a_file_given_as_the_folder(tmp_path):
    f = tmp_path / "summary.json"
    f.write_text("{}")
    with pytest.raises(TrackingError, match="is a file, not a folder"):
        tracking.sync_pending(f)


def test_list_runs_table_and_download_adapter(store, tmp_path, adapter_dir):
    report_dir = tmp_path / "eval"
    report_dir.mkdir()
    (report_dir / "report.md").write_text("# base vs adapted\n")
    ids = {}
    for name, recall in (("low", 0.3), ("high", 0.9), ("none", None)):
        t = _tracker(store, tmp_path, "listing")
        ids[name] = t.start_run(name, {"model.name": "tiny", "lora.r": 8, "train.lr": 1e-4}, {})
        if recall is not None:
            t.log_metrics({"adapted/retrieval/recall@10": recall, "base/retrieval/recall@10": 0.2,
                           "adapted/retrieval/r_cap@10": recall + 0.05,
                           "adapted/classification/macro_f1": 1.2 - recall, "adapted/retrieval/ndcg@10": recall / 2},
                          step=5)
            t.log_artifacts(adapter_dir, "adapter")
        if name == "high":
            t.log_artifacts(report_dir, "eval")
        assert t.end()
    rows = runs.list_runs(store, "listing")
    assert [r["name"] for r in rows] == ["high", "low", "none"]
    assert rows[0]["metrics.adapted/retrieval/recall_at_10"] == 0.9 and rows[0]["params.lora.r"] == "8"
    assert rows[0]["metrics.adapted/retrieval/r_cap_at_10"] == pytest.approx(0.95)  # both recalls in the table
    assert rows[0]["status"] == "FINISHED" and rows[2]["metrics.adapted/retrieval/recall_at_10"] is None
    info = _client(store).get_run(ids["high"]).info
    assert rows[0]["duration_s"] == (info.end_time - info.start_time) / 1000 and rows[0]["parent_run_id"] is None
    assert [r["name"] for r in runs.list_runs(store, "listing", max_results=2)] == ["high", "low"]
    table = runs.format_runs_table(rows).splitlines()
    assert table[0].split()[:4] == ["run_id", "name", "status", "start"]
    assert "0.9000" in table[2] and ids["high"] in table[2] and table[4].rstrip().endswith("-")
    assert runs.format_runs_table([]) == "(no runs)"
    # Sorted by a metric outside the default columns: that metric gets a column.
    by_f1 = runs.list_runs(store, "listing", sort_by="metrics.adapted/classification/macro_f1")
    assert [r["name"] for r in by_f1] == ["low", "high", "none"]
    assert by_f1[0]["metrics.adapted/classification/macro_f1"] == pytest.approx(0.9)  # the column has its values
    by_ndcg = runs.list_runs(store, "listing", sort_by="metrics.adapted/retrieval/ndcg@10")  # not a main metric
    assert [r["metrics.adapted/retrieval/ndcg_at_10"] for r in by_ndcg] == [pytest.approx(0.45), pytest.approx(0.15), None]
    header = runs.format_runs_table(by_f1, runs.runs_columns("metrics.adapted/classification/macro_f1"))
    assert header.splitlines()[0].split()[-1] == "adapted/classification/macro_f1"
    with pytest.raises(TrackingError, match=r"--sort metrics.adapted/retrieval/recal@10: no run of experiment "
                                            r"'listing' has metric 'adapted/retrieval/recal_at_10'; choose one of: "
                                            r"metrics.adapted/classification/macro_f1, "):
        runs.list_runs(store, "listing", sort_by="metrics.adapted/retrieval/recal@10")
    with pytest.raises(TrackingError, match="has param 'lora.rank'; choose one of: params.lora.r, "):
        runs.list_runs(store, "listing", sort_by="params.lora.rank")
    with pytest.raises(TrackingError, match="--sort recall: Invalid attribute key 'recall'.*; sort by metrics.<name>"):
        runs.list_runs(store, "listing", sort_by="recall")
    assert len(runs.list_runs(store, "listing", sort_by="start_time")) == 3  # a run attribute sorts too
    assert runs.runs_columns("metrics.adapted/retrieval/recall@10") == list(runs.DEFAULT_COLUMNS)
    with pytest.raises(TrackingError, match="no MLflow experiment 'missing'"):
        runs.list_runs(store, "missing")

    got = runs.download_adapter(store, ids["high"], tmp_path / "dl")
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in adapter_dir.iterdir())
    assert (got / "adapter_model.safetensors").read_bytes() == (adapter_dir / "adapter_model.safetensors").read_bytes()
    # The run's report comes along, laid out as in a run folder, for the export's model card.
    assert (tmp_path / "dl" / "eval" / "report.md").read_text() == "# base vs adapted\n"
    with pytest.raises(TrackingError, match="no adapter/ artifact"):
        runs.download_adapter(store, ids["none"], tmp_path / "dl2")
    with pytest.raises(TrackingError, match="not found"):
        runs.download_adapter(store, "0" * 32, tmp_path / "dl3")


def test_reading_commands_do_not_create_a_missing_sqlite_store(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from embedft.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = CliRunner().invoke(main, ["runs", "list"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr.startswith(f"error: no MLflow database at {tmp_path / 'mlflow.db'}: nothing was tracked there")
    with pytest.raises(TrackingError, match="run from the folder you trained in"):
        runs.download_adapter(f"sqlite:///{tmp_path / 'mlflow.db'}", "0" * 32, tmp_path / "dl")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("stored_before_failure", [False, True], ids=["request-failed", "response-lost"])
def test_a_failure_at_end_is_retried_without_sending_a_point_twice(store, tmp_path, monkeypatch, stored_before_failure):
    t = _tracker(store, tmp_path, "flaky-end", max_backoff=30.0)
    run_id = t.start_run("flaky-end", {}, {})
    sent = []
    monkeypatch.setattr(t._client, "log_batch", _flaky(_recording(t._client.log_batch, sent),
                                                       fail_before=not stored_before_failure, times=1))
    t._next_try = time.monotonic() + 1000  # hold the background sender: end() makes the first request
    for s in range(5):
        t.log_metrics({"train/loss": 1.0 / (s + 1)}, step=s)
    assert t.end()
    # SQLite drops an exact repeat itself; other stores would keep it, so it must not be sent again.
    assert sorted((k, s) for k, s, _, _ in sent) == [("train/loss", s) for s in range(5)]
    assert _history(_client(store), run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(5)]


def test_a_spooled_failed_run_syncs_as_failed_with_its_own_end_time(store, tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    t = _tracker(store, tmp_path, "spool-failed")
    run_id = t.start_run("spool-failed", {}, {})

    def down(*a, **kw):
        raise MlflowException("connection refused")

    for name in ("log_batch", "set_terminated", "get_metric_history"):
        monkeypatch.setattr(t._client, name, down)
    t.log_metrics({"train/loss": 2.0}, step=1)
    assert t.end("FAILED") is False
    meta = json.loads((tmp_path / "out" / ".mlflow-pending" / run_id / "spool.json").read_text())
    assert meta["status"] == "FAILED"
    time.sleep(0.05)
    assert tracking.sync_pending(tmp_path / "out" / ".mlflow-pending") == 1
    info = _client(store).get_run(run_id).info
    assert info.status == "FAILED" and info.end_time == meta["end_time"]  # not the time of the sync


def test_sync_keeps_a_spool_it_cannot_deliver_and_uri_overrides_the_spools_own(store, tmp_path):
    c = _client(store)
    run_id = c.create_run(c.create_experiment("sync-uri")).info.run_id
    spool = tmp_path / ".mlflow-pending" / run_id
    spool.mkdir(parents=True)
    dead = f"http://127.0.0.1:{_free_port()}"
    (spool / "spool.json").write_text(json.dumps({"run_id": run_id, "uri": dead, "status": "FINISHED"}))
    (spool / "records.jsonl").write_text(json.dumps({"type": "metric", "key": "train/loss", "value": 0.5,
                                                     "timestamp": 1, "step": 3}) + "\n")
    with pytest.raises(TrackingError, match=r"delivered 0 records, but 1 spooled run\(s\) are still pending.*not reachable"):
        tracking.sync_pending(tmp_path / ".mlflow-pending")
    assert (spool / "records.jsonl").is_file()  # kept for the next try
    assert tracking.sync_pending(tmp_path / ".mlflow-pending", uri=store) == 1
    assert c.get_run(run_id).info.status == "FINISHED" and _history(c, run_id, "train/loss") == [(3, 0.5)]
    assert not (tmp_path / ".mlflow-pending").exists()


def test_params_that_cannot_be_logged_end_the_new_run_failed(store, tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    real = tracking.mlflow_client

    def client_that_drops_batches(uri):
        client = real(uri)

        def down(*a, **kw):
            raise MlflowException("connection reset by peer")

        client.log_batch = down
        return client

    monkeypatch.setattr(tracking, "mlflow_client", client_that_drops_batches)
    with pytest.raises(TrackingError, match="cannot log the params of run"):
        _tracker(store, tmp_path, "params-fail").start_run("p", {"lora.r": 4}, {})
    c = _client(store)
    (run,) = c.search_runs([c.get_experiment_by_name("params-fail").experiment_id])
    assert run.info.status == "FAILED"  # not left RUNNING


def test_an_end_the_store_refuses_for_good_is_not_spooled(store, tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    t = _tracker(store, tmp_path, "refused-end")
    t.start_run("refused-end", {}, {})

    def refuse(*a, **kw):
        raise MlflowException("bad status", error_code=codes.INVALID_PARAMETER_VALUE)

    monkeypatch.setattr(t._client, "set_terminated", refuse)
    assert t.end("FINISHED") is True  # a sync would be refused the same way, for ever
    assert not (tmp_path / "out" / ".mlflow-pending").exists()


def test_end_stale_run_closes_only_a_run_left_running(store, tmp_path):
    c = _client(store)
    done = _tracker(store, tmp_path, "stale")
    finished = done.start_run("finished", {}, {})
    assert done.end()
    running = c.create_run(c.get_experiment_by_name("stale").experiment_id).info.run_id
    t = _tracker(store, tmp_path, "stale")
    t.start_run("resumed", {}, {})
    t.end_stale_run(finished)
    t.end_stale_run(running)
    assert t.end()
    assert c.get_run(finished).info.status == "FINISHED" and c.get_run(running).info.status == "KILLED"


def test_deliver_drops_only_the_record_the_store_refuses(store, tmp_path):
    c = _client(store)
    run_id = c.create_run(c.create_experiment("refused")).info.run_id
    c.log_param(run_id, "lora.r", "4")
    records = [{"type": "metric", "key": "train/loss", "value": 1.0, "timestamp": 1, "step": 0},
               {"type": "param", "key": "lora.r", "value": "8"},  # params cannot change: refused for good
               {"type": "metric", "key": "train/loss", "value": 0.5, "timestamp": 2, "step": 1},
               {"type": "tag", "key": "note", "value": "kept"}]
    done = []
    delivery.deliver(c, run_id, records, done.extend)
    assert sorted(map(json.dumps, done)) == sorted(map(json.dumps, records))  # none left pending
    run = c.get_run(run_id)
    assert _history(c, run_id, "train/loss") == [(0, 1.0), (1, 0.5)]
    assert run.data.params["lora.r"] == "4" and run.data.tags["note"] == "kept"


def test_is_permanent_keeps_retryable_server_answers():
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    def err(code):
        return MlflowException("x", error_code=code)

    assert delivery.is_permanent(err(codes.INVALID_PARAMETER_VALUE))  # 400: a bad value stays bad
    assert delivery.is_permanent(FileNotFoundError("gone"))
    for transient in (err(codes.RESOURCE_DOES_NOT_EXIST), err(codes.REQUEST_LIMIT_EXCEEDED), err(codes.INTERNAL_ERROR),
                      err(codes.TEMPORARILY_UNAVAILABLE), ConnectionError("reset"), TimeoutError()):
        assert not delivery.is_permanent(transient), transient


def test_log_batch_chunks_stay_within_mlflows_limits():
    metrics = [{"type": "metric", "key": "m", "value": 1.0, "timestamp": 1, "step": s} for s in range(1500)]
    params = [{"type": "param", "key": f"p{i}", "value": "v"} for i in range(150)]
    chunks = list(delivery._log_batch_chunks(metrics + params))
    assert [c for chunk in chunks for c in chunk] == metrics + params  # nothing lost or reordered
    assert all(len(c) <= delivery.BATCH_METRICS for c in chunks)
    assert all(sum(r["type"] != "metric" for r in c) <= delivery.BATCH_PARAMS_TAGS for c in chunks)
    tags = [{"type": "tag", "key": "k", "value": "a"}, {"type": "tag", "key": "k", "value": "b"}]
    assert list(delivery._log_batch_chunks(tags)) == [[tags[0]], [tags[1]]]  # one value of a key per request


# ---------------------------------------------------------------------------------------
# Pure helpers (no store)


def test_resolve_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri(SimpleNamespace(uri=None)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.resolve_uri(SimpleNamespace(uri="sqlite:///sub/x.db")) == f"sqlite:///{tmp_path.resolve()}/sub/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_uri(SimpleNamespace(uri=None)) == "http://127.0.0.1:5000"
    assert tracking.resolve_uri(SimpleNamespace(uri="http://mlflow:8080")) == "http://mlflow:8080"


def test_metric_key_is_accepted_by_mlflow():
    from mlflow.utils.validation import _validate_metric_name

    for raw, want in (("val/recall@10", "val/recall_at_10"), ("retrieval/IVF256,Flat/mrr@10",
                                                              "retrieval/IVF256_Flat/mrr_at_10"),
                      ("a//b/./c", "a/b/c"), ("train/loss", "train/loss")):
        assert metric_key(raw) == want
        _validate_metric_name(want)


def test_dead_server_fails_fast_with_the_fix(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as e:
        tracking.check_reachable(uri, timeout=2)
    assert time.monotonic() - t0 < 3
    msg = str(e.value)
    assert uri in msg and "mlflow server" in msg and "tracking.enabled=false" in msg and "MLFLOW_TRACKING_URI" in msg
    with pytest.raises(TrackingError, match="not reachable"):
        Tracker(uri, "x", tmp_path).start_run("r", {}, {})


def test_null_tracker_accepts_everything(tmp_path):
    with NullTracker() as t:
        assert t.start_run("r", {"a": 1}, {"b": "c"}, parent_run_id="p") is None
        t.log_metrics({"x": 1.0}, step=1)
        t.log_params({"a": 1})
        t.set_tags({"k": "v"})
        t.log_text("t", "config.yaml")
        t.log_artifact(tmp_path, "plots")
        t.log_artifacts(tmp_path, "adapter")
        t.log_input("n", "d", 1, "s", "training")
        assert t.flush() and t.end("FAILED")


def test_import_does_not_load_mlflow():
    code = "import sys, embedft.tracking.mlflow, embedft.evaluation.plots; print('mlflow' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------
# A real `mlflow server`


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store and proxied artifacts, in its own process group."""

    def __init__(self, root: Path, db: Path):
        self.root, self.db, self.port = root, db, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner / huey workers
        self.log = open(self.root / f"server-{time.time():.0f}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.logs()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        raise RuntimeError(f"mlflow server not healthy after {timeout}s: {self.logs()}")

    def kill(self) -> None:
        """SIGKILL the whole group: `mlflow server` runs uvicorn as a child that proc.kill() would orphan."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group
            except ProcessLookupError:
                pass
            self.log.close()
        self.proc = None

    def logs(self) -> str:
        return "".join(sorted(p.read_text() for p in self.root.glob("server-*.log")))[-3000:]


@pytest.fixture(scope="module")
def server(template_db, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    shutil.copy(template_db, root / "mlflow.db")
    srv = MlflowServer(root, root / "mlflow.db")
    try:
        srv.start()
        yield srv
    finally:
        srv.kill()


@pytest.mark.slow
def test_http_run_roundtrip(server, tmp_path, adapter_dir):
    t = _tracker(server.uri, tmp_path, "http")
    run_id = t.start_run("http", PARAMS, {"embedft.family": "bert"})
    _log_everything(t, adapter_dir, range(15))
    assert t.end() is True
    c = _client(server.uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["lora.r"] == "4"
    assert _history(c, run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(15)]
    assert "adapter/adapter_model.safetensors" in _artifacts(c, run_id)
    assert len(run.inputs.dataset_inputs) == 2
    # Proxied artifacts land in the server's --artifacts-destination.
    assert list((server.root / "artifacts").rglob("adapter_model.safetensors"))
    got = runs.download_adapter(server.uri, run_id, tmp_path / "dl")
    assert (got / "adapter_config.json").read_text() == (adapter_dir / "adapter_config.json").read_text()


@pytest.mark.slow
def test_server_killed_mid_run_spools_and_syncs(server, tmp_path, adapter_dir):
    spool_root = tmp_path / "out" / ".mlflow-pending"
    t = _tracker(server.uri, tmp_path, "fault")
    run_id = t.start_run("fault", PARAMS, {})
    t.log_text("name: fault\n", "config.yaml")
    for s in range(10):
        t.log_metrics({"train/loss": 1.0 / (s + 1)}, step=s)
    assert t.flush(20) and t.delivered >= 11

    server.kill()
    slowest = 0.0
    for s in range(10, 30):
        t0 = time.monotonic()
        t.log_metrics({"train/loss": 1.0 / (s + 1)}, step=s)
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.02)
    t.log_artifacts(adapter_dir, "adapter")
    assert slowest < 0.5
    t0 = time.monotonic()
    assert t.end("FINISHED") is False
    assert time.monotonic() - t0 < 20
    records = [json.loads(x) for x in (spool_root / run_id / "records.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if r["type"] == "metric") == list(range(10, 30))
    assert (spool_root / run_id / "files").is_dir()

    server.start()
    c = _client(server.uri)
    assert c.get_run(run_id).info.status == "RUNNING"
    assert _history(c, run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(10)]
    assert tracking.sync_pending(spool_root) == len(records)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _history(c, run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(30)]  # no duplicates
    assert run.data.params["model.name"] == "tiny"
    assert {"config.yaml", "adapter/adapter_model.safetensors", "adapter/embedft_meta.json"} <= _artifacts(c, run_id)
    assert not spool_root.exists()


# ---------------------------------------------------------------------------------------
# Plots


def _png(path: Path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)  # (H, W, 4) floats
    assert img.std() > 0.05, "the image is blank"
    return img


def test_loss_curve_smoothing_averages_the_last_window_points():
    from embedft.evaluation import plots

    assert plots._moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert plots._moving_average([4.0, 0.0, 2.0], 5) == [4.0, 2.0, 2.0]  # fewer points than the window


def test_plots_write_real_pngs(tmp_path):
    from embedft.evaluation import plots

    steps = list(range(0, 300, 10))
    loss = plots.plot_loss_curve(steps, [2.0 / (1 + s / 50) for s in steps], tmp_path / "p" / "loss.png",
                                 val_epochs=[100, 200, 290], val_recall=[0.4, None, 0.7])
    assert _png(loss).shape == (4 * plots.DPI, 7 * plots.DPI, 4)
    rec = plots.plot_recall_curve([1, 5, 10, 100], {1: 0.2, 5: 0.4, 10: 0.5, 100: 0.8},
                                  {"1": 0.3, "5": 0.6, "10": 0.7, "100": 0.95}, tmp_path / "recall.png")
    assert _png(rec).shape == (4 * plots.DPI, 6 * plots.DPI, 4)
    only_adapted = plots.plot_recall_curve([1, 10], {}, {1: 0.5, 10: 0.9}, tmp_path / "recall_adapted.png")
    _png(only_adapted)
    cm = plots.plot_confusion_matrix([[5, 1, 0], [0, 4, 2], [1, 0, 7]], ["refund", "delivery", "account"],
                                     tmp_path / "cm.png", "adapted kNN")
    h, w, _ = _png(cm).shape
    assert (h, w) == (4 * plots.DPI, 5 * plots.DPI)
    with pytest.raises(ValueError, match="does not match"):
        plots.plot_confusion_matrix([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "bad.png", "x")


# ---------------------------------------------------------------------------------------
# The whole pipeline against a real server


@pytest.mark.slow
def test_train_over_http_then_eval_and_export_from_the_run(server, tmp_path, tiny_bert_dir, monkeypatch):
    from click.testing import CliRunner

    from embedft.cli import main
    from embedft.config import load_config
    from embedft.recipes.train import run_train

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    overrides = [f"model.name={tiny_bert_dir}", f"data.train={repo / 'data' / 'products.csv'}",
                 f"tracking.uri={server.uri}", "tracking.experiment=http-train", "train.epochs=2",
                 "train.max_steps=6", "train.batch_size=16", "train.log_every=1", "eval.indexes=[]",
                 "tracking.run_name=http-r16"]
    cfg = load_config(repo / "experiments" / "default.yaml", overrides)
    summary = run_train(cfg, progress=False)
    run_id = summary["run_id"]

    c = _client(server.uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "http-r16"  # tracking.run_name names the MLflow run (the run folder keeps cfg.name)
    assert summary["output_dir"] == str(Path("runs") / "default")
    assert run.data.params["lora.r"] == "16" and run.data.params["model.name"] == str(tiny_bert_dir)
    assert run.data.tags["embedft.family"] == "bert"
    assert [s for s, _ in _history(c, run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]  # every step, in full
    assert len(_history(c, run_id, "train/lr")) == 6
    assert len(_history(c, run_id, "val/recall_at_10")) == 1  # max_steps ends training inside epoch 1
    for key in ("adapted/retrieval/recall_at_10", "base/retrieval/recall_at_10", "adapted/classification/macro_f1"):
        assert key in run.data.metrics
    assert run.data.metrics["adapted/retrieval/recall_at_10"] == pytest.approx(
        summary["metrics"]["adapted/retrieval/recall@10"])
    files = _artifacts(c, run_id)
    assert {"config.yaml", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
            "adapter/embedft_meta.json", "eval/report.json", "eval/report.md", "plots/loss.png",
            "plots/recall_at_k.png", "plots/confusion_matrix.png"} <= files
    assert len(run.inputs.dataset_inputs) == 2

    # The adapter is loadable from the run: eval --run and export --run use it.
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the run's adapter is downloaded to
    env = {"MLFLOW_TRACKING_URI": server.uri}
    args = ["eval", str(repo / "experiments" / "default.yaml"), *sum((["-o", o] for o in overrides), []),
            "--run", run_id, "--out", str(tmp_path / "eval-from-run"), "--no-base"]
    res = CliRunner().invoke(main, args, env=env)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "eval-from-run" / "report.json").read_text())
    assert report["adapted"]["retrieval/recall@10"] == pytest.approx(summary["metrics"]["adapted/retrieval/recall@10"],
                                                                     abs=1e-6)
    assert not [p for p in scratch.iterdir() if p.name.startswith("embedft-adapter-")]  # the download is removed
    (ev,) = c.search_runs([run.info.experiment_id], filter_string=f"tags.`embedft.source_run_id` = '{run_id}'")
    assert ev.info.status == "FINISHED" and ev.data.tags["embedft.command"] == "eval"
    assert ev.data.params["lora.r"] == "16" and not any(k.startswith("base/") for k in ev.data.metrics)  # --no-base
    assert not any(k.startswith("gain/") for k in ev.data.metrics) and "_key/recall_at_10" in ev.data.metrics
    assert ev.data.metrics["adapted/retrieval/recall_at_10"] == pytest.approx(report["adapted"]["retrieval/recall@10"])
    res = CliRunner().invoke(main, ["export", "--run", run_id, "--out", str(tmp_path / "export")], env=env)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "export" / "modules.json").is_file()
    # The export names the run, not the temporary download, and its model card has the run's eval table.
    saved = json.loads((tmp_path / "export" / "embedft_export.json").read_text())
    assert saved["adapter"]["dir"] == f"runs:/{run_id}/adapter"
    card = (tmp_path / "export" / "README.md").read_text()
    assert "## Evaluation (base vs adapted, from the training run)" in card and "retrieval/recall@10" in card


def _tiny_train_args(repo: Path, tiny_bert_dir: Path, uri: str, *extra: str) -> list[str]:
    return ["train", str(repo / "experiments" / "default.yaml"), "--no-progress",
            "-o", f"model.name={tiny_bert_dir}", "-o", f"data.train={repo / 'data' / 'products.csv'}",
            "-o", f"tracking.uri={uri}", "-o", "train.batch_size=8", "-o", "eval.indexes=[]",
            "-o", "eval.compare_base=false", *extra]


def test_sweep_runs_children_under_one_parent(tmp_path, tiny_bert_dir, monkeypatch, template_db):
    from click.testing import CliRunner

    from embedft.cli import main

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _tiny_train_args(repo, tiny_bert_dir, uri, "-o", "train.max_steps=2", "-o", "eval.compare_base=true",
                            "--sweep", "lora.r=2,4", "--sweep", "train.lr=1e-3")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    c = _client(uri)
    exp = c.get_experiment_by_name("default")
    found = c.search_runs([exp.experiment_id])
    parents = [r for r in found if r.data.tags.get("embedft.sweep") == "parent"]
    assert len(parents) == 1
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.params["lora.r"] for r in children) == ["2", "4"]
    assert {r.data.params["train.lr"] for r in children} == {"0.001"}
    assert all("adapted/retrieval/recall_at_10" in r.data.metrics for r in children)
    # The sweep points got their own run folders, each with its summary: base and adapted side by side.
    for r in children:
        folder = tmp_path / "runs" / r.info.run_name
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["run_id"] == r.info.run_id and summary["steps"] == 2
        assert summary["output_dir"] == str(Path("runs") / r.info.run_name)
        assert summary["adapter"] == str(Path(summary["output_dir"]) / "adapter") and (folder / "adapter").is_dir()
        m = summary["metrics"]
        adapted = {k.split("/", 1)[1] for k in m if k.startswith("adapted/")}
        assert "retrieval/recall@10" in adapted and adapted == {k.split("/", 1)[1] for k in m if k.startswith("base/")}
        assert all(r.data.metrics[metric_key(k)] == pytest.approx(v) for k, v in m.items())
        # The adapter names its run (export --register links the model version to it); the config is beside it.
        assert json.loads((folder / "adapter" / "embedft_meta.json").read_text())["mlflow_run_id"] == r.info.run_id
        assert f"r: {r.data.params['lora.r']}" in (folder / "config.yaml").read_text()
    assert sorted(r.info.run_name for r in children) == ["default-r2-lr1e-3", "default-r4-lr1e-3"]
    assert {r.data.tags["embedft.experiment"] for r in children} == {"default"}  # the names say what differs
    # Final figures are one value at step 0 (the UI's chart view draws bars for them), with the gain over the base.
    for r in children:
        assert _history(c, r.info.run_id, "adapted/retrieval/recall_at_10") == [
            (0, r.data.metrics["adapted/retrieval/recall_at_10"])]
        assert r.data.metrics["gain/retrieval/recall_at_10"] == pytest.approx(
            r.data.metrics["adapted/retrieval/recall_at_10"] - r.data.metrics["base/retrieval/recall_at_10"])
        assert r.data.metrics["_key/macro_f1"] == r.data.metrics["adapted/classification/macro_f1"]
    # The parent carries its best child's figures, and names that child.
    top = max(sorted(children, key=lambda r: r.info.start_time),  # the first child in sweep order on a tie (ui.best)
              key=lambda r: r.data.metrics["_key/recall_at_10"])
    parent = c.get_run(parents[0].info.run_id)
    assert parent.data.tags["embedft.best_run_id"] == top.info.run_id
    assert parent.data.tags["embedft.best_run"] == top.info.run_name
    evaluation = {k: v for k, v in top.data.metrics.items() if k.startswith(("adapted/", "base/", "gain/", "_key/"))}
    assert {k: v for k, v in parent.data.metrics.items()} == evaluation
    # The command ends with the link that opens the runs as model training, with the key figures as columns.
    assert (f"mlflow ui:  http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
            "&viewStateShareKey=embedft-key-figures (after `make ui`)") in res.output

    res = CliRunner().invoke(main, ["runs", "list", "--experiment", "default"], env={"MLFLOW_TRACKING_URI": uri})
    assert res.exit_code == 0, res.output
    assert "default-r2-lr1e-3" in res.output and "default-r4-lr1e-3" in res.output


def test_interrupted_run_is_killed_and_resume_links_it(tmp_path, tiny_bert_dir, monkeypatch, template_db):
    from click.testing import CliRunner

    import embedft.training.loop as T
    from embedft.cli import main

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _tiny_train_args(repo, tiny_bert_dir, uri, "-o", "train.epochs=2", "-o", "train.max_steps=6")
    real_save = T.save_checkpoint

    def save_then_interrupt(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt  # Ctrl-C right after the first epoch's checkpoint

    monkeypatch.setattr(T, "save_checkpoint", save_then_interrupt)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "Aborted" in res.output, res.output  # click's answer to Ctrl-C
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    first = (tmp_path / "runs" / "default" / ".mlflow-run-id").read_text()
    c = _client(uri)
    assert c.get_run(first).info.status == "KILLED"

    c.update_run(first, status="RUNNING")  # as a SIGKILL would have left it
    res = CliRunner().invoke(main, args + ["--resume"])
    assert res.exit_code == 0, res.output
    second = (tmp_path / "runs" / "default" / ".mlflow-run-id").read_text()
    assert second != first
    assert c.get_run(first).info.status == "KILLED"
    run = c.get_run(second)
    assert run.info.status == "FINISHED" and run.data.tags["embedft.resumed_from"] == first
    assert (c.get_run(first).info.run_name, run.info.run_name) == ("default", "default-2")  # told apart
    assert f"mlflow run: default-2 ({second})" in res.output


def test_sigterm_ends_the_mlflow_run_as_killed(tmp_path, tiny_bert_dir, template_db):
    repo = Path(__file__).resolve().parents[2]
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _tiny_train_args(repo, tiny_bert_dir, uri, "-o", "train.epochs=1000")
    proc = subprocess.Popen([sys.executable, "-m", "embedft", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    id_file = tmp_path / "runs" / "default" / ".mlflow-run-id"
    deadline = time.monotonic() + 120
    while not id_file.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert id_file.is_file(), proc.stderr.read() if proc.poll() is not None else "no run started in 120 s"
    time.sleep(1.0)  # training under way
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in proc.stderr.read()  # the log says why it stopped and how to go on
    assert _client(uri).get_run(id_file.read_text()).info.status == "KILLED"


def test_only_the_tracking_modules_import_mlflow():
    """STYLE: mlflow stays out of data, model, loss and train code (the recipes talk to a Tracker)."""
    import ast

    package = Path(tracking.__file__).parents[1]
    importers = set()
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                importers.add(path.relative_to(package).as_posix())
    assert importers == {"tracking/mlflow.py", "tracking/delivery.py", "tracking/runs.py"}
