"""Disk faults in the MLflow spool (`.mlflow-pending`, what a run keeps when its server is away): at its records,
its meta, the files it copies and the rename into place. One WriteError naming the file and the fix, and saying
the records are lost; no part of the spool left; another run's spool untouched; the next spool is written whole.
A spool killed (SIGKILL) while written is absent or whole, and `embedft runs sync` delivers what is there."""

import errno
import hashlib
import json
import shutil

import pytest
from faults.disk import CAUSE, run_killed, visible

from embedft.errors import WriteError
from embedft.tracking.delivery import SPOOL_META, SPOOL_RECORDS, read_spool, write_spool

URI = "http://127.0.0.1:5999"
ENOSPC, EACCES, EROFS = errno.ENOSPC, errno.EACCES, errno.EROFS


@pytest.fixture
def records(tmp_path):
    """Metrics, a param, a text and two artifacts (a file and a folder), as a run queues them."""
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
    plot = tmp_path / "run" / "loss.png"
    plot.write_bytes(b"\x89PNG" + b"\0" * 5000)
    out = [{"type": "metric", "key": "train/loss", "value": 1.0 / (s + 1), "timestamp": 1000 + s, "step": s, "seq": s}
           for s in range(300)]
    out += [{"type": "param", "key": "lora.r", "value": "4"},
            {"type": "text", "text": "name: t\n" * 100, "artifact_file": "config.yaml"},
            {"type": "artifact", "path": str(adapter), "artifact_path": "adapter", "is_dir": True},
            {"type": "artifact", "path": str(plot), "artifact_path": "plots", "is_dir": False}]
    return out


def meta(run_id: str) -> dict:
    return {"run_id": run_id, "uri": URI, "status": "FINISHED", "end_time": 1}


def tree(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# (file, bytes written or rename point, errno, what the message names in the spool folder)
CASES = [
    (SPOOL_RECORDS, 0, ENOSPC, SPOOL_RECORDS),
    (SPOOL_RECORDS, 7, ENOSPC, SPOOL_RECORDS),
    (SPOOL_RECORDS, 4096, ENOSPC, SPOOL_RECORDS),
    (SPOOL_RECORDS, 7, EACCES, SPOOL_RECORDS),
    (SPOOL_RECORDS, 7, EROFS, SPOOL_RECORDS),
    (SPOOL_META, 7, ENOSPC, SPOOL_META),
    ("config.yaml", 7, ENOSPC, "files/0/config.yaml"),  # a text, kept as a file
    ("adapter_model.safetensors", 4096, ENOSPC, ""),  # an artifact folder's copy (shutil.copytree)
    ("loss.png", 7, EROFS, ""),  # an artifact file's copy (shutil.copy2)
    ("run-b", "before", EACCES, ""),  # the rename into place
]


@pytest.mark.parametrize("at, after, code, named", CASES)
def test_a_spool_the_disk_refuses_is_one_error_and_leaves_nothing(tmp_path, records, disk, at, after, code, named):
    root = tmp_path / "run" / ".mlflow-pending"
    other = write_spool(root / "run-a", records[:3], meta("run-a"))  # another run's, spooled earlier
    before = tree(other)
    point = disk(at, after, code)
    with pytest.raises(WriteError) as e:
        write_spool(root / "run-b", records, meta("run-b"))
    fix = "free space there or put the run folder elsewhere" if code == ENOSPC else \
        "put the run folder elsewhere (a folder you can write)"
    shown = root / "run-b" / named if named else root / "run-b"
    assert point.fired and str(e.value) == (f"cannot write {shown}: {CAUSE[code]}; {fix}; MLflow at {URI} did not "
                                            f"take run run-b's {len(records)} records, and they could not be kept")
    assert [p.name for p in root.iterdir()] == ["run-a"] and tree(other) == before
    # The disk has room again: the next spool is written whole and reads back as it was given.
    folder = write_spool(root / "run-b", records, meta("run-b"))
    got_meta, got = read_spool(folder)
    assert got_meta == meta("run-b") and len(got) == len(records)
    assert [r for r in got if r["type"] == "metric"] == [{k: v for k, v in r.items() if k != "seq"}
                                                         for r in records[:300]]
    assert (folder / "files" / "0" / "config.yaml").read_text() == "name: t\n" * 100
    assert tree(folder / "files" / "1") == tree(tmp_path / "run" / "adapter")


def test_a_run_spooled_twice_keeps_both_and_a_missing_artifact_is_skipped(tmp_path, records, caplog):
    root = tmp_path / ".mlflow-pending"
    first = write_spool(root / "r1", records[:2], meta("r1"))
    shutil.rmtree(tmp_path / "run" / "adapter")  # moved away before the run ended: not a disk fault
    second = write_spool(root / "r1", records, meta("r1"))
    assert (first.name, second.name) == ("r1", "r1-2") and len(read_spool(first)[1]) == 2
    assert len(read_spool(second)[1]) == len(records) - 1 and "cannot keep artifact" in caplog.text


def test_ending_a_failed_run_shows_its_own_error_and_logs_the_spools(caplog):
    from embedft.recipes.common import ending

    class SpoolRefused:
        def end(self, status):
            raise WriteError(f"cannot write .mlflow-pending/r1/records.jsonl (run {status})")

    with pytest.raises(ValueError, match="the run's own error"):
        with ending(SpoolRefused()):
            raise ValueError("the run's own error")
    assert "cannot write .mlflow-pending/r1/records.jsonl (run FAILED)" in caplog.text
    with pytest.raises(WriteError, match=r"records.jsonl \(run FINISHED\)"):  # a finished run fails on it
        with ending(SpoolRefused()):
            pass


def test_a_tracker_whose_spool_the_disk_refuses_says_so_once(template_db, tmp_path, disk, monkeypatch):
    from mlflow.exceptions import MlflowException

    from embedft.tracking.mlflow import MlflowTracker

    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    t = MlflowTracker(f"sqlite:///{db}", "spool-full", tmp_path / "run" / ".mlflow-pending", flush_interval=0.05,
                      end_timeout=0.5, max_backoff=0.1)
    run_id = t.start_run("spool-full", {}, {})

    def down(*a, **kw):
        raise MlflowException("connection refused")

    for name in ("log_batch", "set_terminated", "get_metric_history"):
        monkeypatch.setattr(t._client, name, down)
    t.log_metrics({"train/loss": 2.0}, step=1)
    disk(SPOOL_RECORDS, 7, ENOSPC)
    with pytest.raises(WriteError, match=rf"cannot write .*{run_id}/records.jsonl: no space left on the device; "
                                         rf"free space there .*did not take run {run_id}'s 1 records"):
        t.end()
    assert t.end() is False  # ended: not spooled again
    assert list((tmp_path / "run" / ".mlflow-pending").iterdir()) == []


SPOOL = """
import json
from pathlib import Path
from embedft.tracking.delivery import write_spool
write_spool(Path({folder!r}), json.loads({records!r}), json.loads({meta!r}))
"""


@pytest.mark.parametrize("at, after, delivered", [("records.jsonl", 4096, False), ("spool.json", 7, False),
                                                  ("b", "after", True)])
def test_a_spool_killed_while_written_is_absent_or_whole_and_sync_delivers(template_db, tmp_path, at, after,
                                                                          delivered):
    from mlflow import MlflowClient

    from embedft.tracking.delivery import write_spool
    from embedft.tracking.mlflow import sync_pending

    db = tmp_path / "mlflow.db"
    shutil.copy(template_db, db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    exp = client.create_experiment("killed-spool")
    root = tmp_path / "run" / ".mlflow-pending"
    runs, metas = {}, {}
    for name in ("a", "b"):
        runs[name] = client.create_run(exp).info.run_id
        metas[name] = {"run_id": runs[name], "uri": uri, "status": "FINISHED", "end_time": 1}
    records = [{"type": "metric", "key": "train/loss", "value": 1.0 / (s + 1), "timestamp": 1000 + s, "step": s}
               for s in range(200)]
    write_spool(root / "a", records, metas["a"])  # spooled before, whole
    run_killed(at, after, SPOOL.format(folder=str(root / "b"), records=json.dumps(records),
                                       meta=json.dumps(metas["b"])), tmp_path)
    assert visible(root) == (["a", "b"] if delivered else ["a"])
    assert sync_pending(root) == len(records) * (2 if delivered else 1)
    statuses = {n: client.get_run(r).info.status for n, r in runs.items()}
    assert statuses == {"a": "FINISHED", "b": "FINISHED" if delivered else "RUNNING"}
    assert len(client.get_metric_history(runs["a"], "train/loss")) == len(records)
