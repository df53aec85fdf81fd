"""Delivering tracking records to MLflow, now (the Tracker's thread) or later (a spool on disk).

A record is a JSON-able dict with a "type": metric(key, value, timestamp, step),
param(key, value), tag(key, value), input(name, digest, n_rows, source, source_type,
context), text(text, artifact_file), artifact(path, artifact_path, is_dir). `deliver` sends
them in `log_batch` requests within MLflow's limits, drops only the records the store refuses
for good, and on request skips metric points already stored, so re-sending never duplicates
history. A spool folder holds what a run could not deliver: records.jsonl, copies of its
artifact files, and spool.json. mlflow is imported lazily, as in `embedft.tracking.mlflow`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Callable, Iterable

from embedft.atomic import building, disk_errno, place_new_dir, write_text

log = logging.getLogger(__name__)
# mlflow.utils.validation limits, restated so importing this module stays cheap.
BATCH_METRICS = 1000
BATCH_PARAMS_TAGS = 100
SPOOL_META = "spool.json"
SPOOL_RECORDS = "records.jsonl"
SPOOL_ELSEWHERE = "put the run folder elsewhere"


def is_permanent(e: BaseException) -> bool:
    """Errors that a retry cannot fix (bad value, missing local file); all else is transient."""
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return True
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        code = e.get_http_status_code()
        return 400 <= code < 500 and code not in (404, 408, 429)
    return False


def _metric_id(key: str, step: int, timestamp: int, value: float) -> tuple:
    return key, int(step), int(timestamp), "nan" if math.isnan(value) else float(value)


def _already_logged(client, run_id: str, metrics: list[dict]) -> set[int]:
    """Indexes of `metrics` whose exact point (key, step, timestamp, value) is already stored."""
    present: set[int] = set()
    for key in sorted({m["key"] for m in metrics}):
        stored = {_metric_id(key, p.step, p.timestamp, p.value) for p in client.get_metric_history(run_id, key)}
        present.update(i for i, m in enumerate(metrics)
                       if m["key"] == key and _metric_id(key, m["step"], m["timestamp"], m["value"]) in stored)
    return present


def _log_batch_chunks(records: list[dict]) -> Iterable[list[dict]]:
    chunk: list[dict] = []
    n_metrics = n_pt = 0
    keys: set[tuple[str, str]] = set()
    for r in records:
        is_metric = r["type"] == "metric"
        dup_key = not is_metric and (r["type"], r["key"]) in keys  # one value per param/tag key per request
        if chunk and (dup_key or n_metrics + n_pt >= BATCH_METRICS or
                      (not is_metric and n_pt >= BATCH_PARAMS_TAGS)):
            yield chunk
            chunk, n_metrics, n_pt, keys = [], 0, 0, set()
        chunk.append(r)
        if is_metric:
            n_metrics += 1
        else:
            n_pt += 1
            keys.add((r["type"], r["key"]))
    if chunk:
        yield chunk


def _send_chunk(client, run_id: str, chunk: list[dict]) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

    kind = chunk[0]["type"]
    if kind in ("metric", "param", "tag"):
        client.log_batch(run_id,
                         metrics=[Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in chunk
                                  if r["type"] == "metric"],
                         params=[Param(r["key"], r["value"]) for r in chunk if r["type"] == "param"],
                         tags=[RunTag(r["key"], r["value"]) for r in chunk if r["type"] == "tag"])
        return
    (r,) = chunk
    if kind == "input":
        ds = Dataset(name=r["name"], digest=r["digest"], source_type=r["source_type"],
                     source=json.dumps({"uri": r["source"]}), profile=json.dumps({"num_rows": r["n_rows"]}))
        client.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", r["context"])])])
    elif kind == "text":
        client.log_text(run_id, r["text"], r["artifact_file"])
    elif kind == "artifact":
        if r["is_dir"]:
            client.log_artifacts(run_id, r["path"], r["artifact_path"])
        else:
            client.log_artifact(run_id, r["path"], r["artifact_path"])
    else:
        raise ValueError(f"unknown record type {kind!r}")


def deliver(client, run_id: str, records: list[dict], done: Callable[[list[dict]], None],
             check_history: bool = False) -> None:
    """Send records in order, calling done() after each confirmed request; raise on a transient failure.

    check_history: first skip metric points the store already has (after a failure whose
    outcome is unknown, or when syncing a spool), so re-sending never duplicates history.
    """
    batchable = [r for r in records if r["type"] in ("metric", "param", "tag")]
    others = [r for r in records if r["type"] not in ("metric", "param", "tag")]
    if check_history:
        metrics = [r for r in batchable if r["type"] == "metric"]
        present = _already_logged(client, run_id, metrics)
        if present:
            seen = [metrics[i] for i in sorted(present)]
            done(seen)
            ids = {id(r) for r in seen}
            batchable = [r for r in batchable if id(r) not in ids]
    chunks = list(_log_batch_chunks(batchable)) + [[r] for r in others]
    for chunk in chunks:
        try:
            _send_chunk(client, run_id, chunk)
        except Exception as e:
            if not is_permanent(e):
                raise
            # One bad record must not sink the others: retry them one by one and drop only the bad ones.
            for r in chunk:
                try:
                    if len(chunk) > 1:
                        _send_chunk(client, run_id, [r])
                    else:
                        raise e
                except Exception as e1:
                    if not is_permanent(e1):
                        raise
                    log.error("MLflow rejected %s %s for run %s, dropping it: %s", r["type"],
                              r.get("key") or r.get("artifact_file") or r.get("path") or r.get("name"), run_id, e1)
                done([r])
            continue
        done(chunk)


def write_spool(folder: Path, records: list[dict], meta: dict) -> Path:
    """Undelivered records as JSONL (+ copies of artifact files, which may not stay in place) and `meta`
    (run id, uri, status, ...) as spool.json, in a folder that appears whole or not at all: built in a
    temporary sibling, then renamed to `folder` (or folder-2, ... when a spool is there already). A disk
    that refuses a write is a WriteError naming the file, and no part of this spool stays."""
    folder = _free_name(folder)
    kept = (f"MLflow at {meta.get('uri')} did not take run {meta.get('run_id')}'s {len(records)} records, "
            "and they could not be kept")
    with building(folder, SPOOL_ELSEWHERE, kept) as tmp:
        lines = [json.dumps(r) + "\n" for r in _keep_files(tmp, records)]
        write_text(tmp / SPOOL_RECORDS, "".join(lines))
        write_text(tmp / SPOOL_META, json.dumps(meta, indent=2))
        place_new_dir(tmp, folder)
    return folder


def _free_name(folder: Path) -> Path:
    # A run spools once; a folder already there (a copy, an earlier attempt) is kept and delivered on its own.
    n, out = 1, folder
    while out.exists():
        n += 1
        out = folder.with_name(f"{folder.name}-{n}")
    return out


def _keep_files(tmp: Path, records: list[dict]) -> Iterable[dict]:
    """The records as spooled: a text becomes a file artifact, an artifact's files are copied into tmp/files/<n>."""
    n = 0
    for r in records:
        r = {k: v for k, v in r.items() if k != "seq"}
        if r["type"] in ("text", "artifact"):
            dst = tmp / "files" / str(n)
            n += 1
            dst.mkdir(parents=True)
            if r["type"] == "text":
                write_text(dst / Path(r["artifact_file"]).name, r["text"])
                parent = str(Path(r["artifact_file"]).parent)
                r = {"type": "artifact", "path": str(dst.relative_to(tmp)), "is_dir": True,
                     "artifact_path": None if parent == "." else parent}
            else:
                src = Path(r["path"])
                try:
                    if r["is_dir"]:
                        shutil.copytree(src, dst, dirs_exist_ok=True)
                    else:
                        shutil.copy2(src, dst / src.name)
                except OSError as e:
                    if disk_errno(e) is not None:
                        raise  # the spool's disk, not the artifact: named by writing_into
                    log.error("cannot keep artifact %s for later delivery: %s", src, e)
                    continue
                r = {**r, "path": str(dst.relative_to(tmp)), "is_dir": True}
        yield r


def read_spool(folder: Path) -> tuple[dict, list[dict]]:
    """A spool folder's meta (run id, uri, status) and its records, artifact paths made absolute."""
    meta = json.loads((folder / SPOOL_META).read_text())
    if not isinstance(meta, dict) or not {"run_id", "uri", "status"} <= meta.keys():
        raise ValueError(f"{SPOOL_META} lacks the run_id, uri or status")
    records = []
    rec_file = folder / SPOOL_RECORDS
    if rec_file.exists():
        for line in rec_file.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r["type"] == "artifact":
                    r["path"] = str(folder / r["path"])
                records.append(r)
    return meta, records
