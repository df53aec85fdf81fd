"""MLflow tracking: with `delivery` and `runs`, the only modules that import mlflow
(lazily, so importing them is cheap).

An `MlflowTracker` (the `Tracker` protocol of `embedft.tracking.base`) logs one run through
`MlflowClient` with explicit run ids (no fluent active-run stack, so sweep children and
threads are safe). Logging calls never block the training loop and never raise because of
the server: records are queued and delivered in `log_batch` requests by a background
thread, retried with backoff while the server is away, and written to a spool folder at
`end()` if it is still away. `sync_pending` (`embedft runs sync`) delivers a spool later.
Re-sending is safe: metrics keep their original timestamps and steps, and already-delivered
points are skipped, so history is never duplicated. How records reach the store, and the
spool format, is `embedft.tracking.delivery`.

Reading runs back (the runs table, a run's adapter, the model registry) is `embedft.tracking.runs`.

MLflow rejects `@` and `,` in metric names, so keys are mapped by `metric_key`:
`retrieval/recall@10` is logged as `retrieval/recall_at_10`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from embedft.errors import TrackingError
from embedft.tracking import ui as mlflow_ui
from embedft.tracking.delivery import SPOOL_META, deliver, is_permanent, read_spool, write_spool
from embedft.tracking.ui import metric_key

log = logging.getLogger(__name__)

# mlflow.utils.validation limits, restated so importing this module stays cheap.
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 8000
MAX_DIGEST_LEN = 36
# mlflow retries a dead server for minutes by default (7 retries, backoff 2); we retry
# ourselves in the background, so each request may fail fast. setdefault: the user's env wins.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


FIX_HINT = ("start it (`make ui` / `mlflow server --backend-store-uri sqlite:///$PWD/mlflow.db --port 5000`), "
            "or set tracking.uri / MLFLOW_TRACKING_URI, or disable tracking with -o tracking.enabled=false")


def resolve_uri(cfg: Any) -> str:
    """cfg.uri, else $MLFLOW_TRACKING_URI, else a SQLite database in the working directory."""
    uri = getattr(cfg, "uri", None) or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if "://" not in uri and uri.endswith(".db"):
        uri = f"sqlite:///{uri}"
    if uri.startswith("sqlite:///"):
        path, _, query = uri[len("sqlite:///"):].partition("?")
        if path and path != ":memory:" and not path.startswith("/"):
            # Absolute, so a later chdir (or another shell) still finds the same database.
            uri = f"sqlite:///{Path(path).resolve()}" + (f"?{query}" if query else "")
    return uri


def _sqlite_path(uri: str) -> Path | None:
    path = uri[len("sqlite:///"):].partition("?")[0] if uri.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when the tracking store cannot be used."""
    from embedft.config import tracking_uri_problem

    problem = tracking_uri_problem(uri)
    if problem:  # the config's uri is checked when it loads; this one may come from $MLFLOW_TRACKING_URI
        raise TrackingError(f"tracking store {uri!r}: {problem}")
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        base = uri.rstrip("/")
        last: Exception | None = None
        for endpoint in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
            try:
                with urllib.request.urlopen(base + endpoint, timeout=timeout) as resp:
                    if resp.status < 500:
                        return
            except urllib.error.HTTPError as e:
                if e.code < 500:  # answered (perhaps 401/404 behind a proxy): it is up
                    return
                last = e
            except Exception as e:  # refused, DNS, timeout: all mean "not reachable"
                last = e
        raise TrackingError(f"MLflow tracking server at {uri} is not reachable: {last}; {FIX_HINT}")
    db = _sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"MLflow database {db}: cannot create its folder: {e}; set tracking.uri "
                                "to a writable location or disable tracking with -o tracking.enabled=false") from e
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingError(f"MLflow database {db} is not writable; set tracking.uri to a writable location "
                                "or disable tracking with -o tracking.enabled=false")


def require_store(uri: str) -> None:
    """For commands that only read: a SQLite store that does not exist is reported, not created empty."""
    db = _sqlite_path(uri)
    if db is not None and not db.exists():
        raise TrackingError(f"no MLflow database at {db}: nothing was tracked there; run from the folder you trained "
                            "in, or point tracking.uri / MLFLOW_TRACKING_URI at the store")


def _value_str(value: Any, limit: int, what: str) -> str:
    s = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    if len(s) > limit:
        log.warning("%s is %d characters; MLflow keeps %d, truncating", what, len(s), limit)
        marker = "...[truncated]"
        s = s[: limit - len(marker)] + marker
    return s


def _now_ms() -> int:
    return int(time.time() * 1000)


def configure_http() -> None:
    for k, v in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def mlflow_client(uri: str):
    configure_http()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


class MlflowTracker:
    """One MLflow run: synchronous start, background delivery, spool on a lost server."""

    def __init__(self, uri: str, experiment: str, spool_dir: str | Path, *, flush_interval: float = 0.5,
                 max_backoff: float = 30.0, end_timeout: float = 15.0):
        self.uri = uri
        self.experiment = experiment
        self.spool_dir = Path(spool_dir)
        self.flush_interval = flush_interval  # gather records this long between requests
        self.max_backoff = max_backoff
        self.end_timeout = end_timeout  # how long end() keeps trying before spooling
        self.run_id: str | None = None
        self.run_name: str | None = None
        self.experiment_id: str | None = None
        self.delivered = 0
        self._client = None
        self._pending: dict[int, dict] = {}
        self._seq = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._failures = 0
        self._uncertain = False  # a request failed midway: some records may be stored already
        self._next_try = 0.0
        self._logged_params: dict[str, str] = {}
        self._result: bool | None = None

    # -- context manager ------------------------------------------------------------------

    def __enter__(self) -> "MlflowTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is not None and self._result is None:
            self.end("FINISHED" if exc_type is None else "KILLED" if exc_type is KeyboardInterrupt else "FAILED")

    # -- public API -------------------------------------------------------------------------

    def links(self) -> dict[str, str]:
        """The run's name and the links that open it and its experiment's runs in the MLflow UI."""
        if not self.run_id:
            return {}
        address = mlflow_ui.ui_address(self.uri)
        return {"run_name": self.run_name, "run_url": mlflow_ui.runs_url(address, self.experiment_id, self.run_id),
                "experiment_url": mlflow_ui.runs_url(address, self.experiment_id)}

    def start_run(self, run_name: str | None, params: dict[str, Any], tags: dict[str, str],
                  parent_run_id: str | None = None) -> str:
        """Create the run and log its params now (a clear TrackingError if the store is unusable).

        The run is named run_name, or run_name-2, -3, ... when a run of the experiment has that name already
        (or got it while this one was created: `settle_run_name`).
        """
        if self.run_id is not None and self._result is None:
            raise TrackingError(f"run {self.run_id} is still active; end() it before starting another")
        check_reachable(self.uri)
        from mlflow.exceptions import MlflowException

        self._client = mlflow_client(self.uri)
        self._logged_params = {}
        all_tags = {"mlflow.source.name": "embedft", "mlflow.source.type": "LOCAL", "mlflow.user": user_name(),
                    **tags}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        clean_tags = {metric_key(k): _value_str(v, MAX_TAG_LEN, f"tag {k}") for k, v in all_tags.items()}
        try:
            exp_id = self._experiment_id()
            wanted = run_name
            if run_name:
                run_name = unique_run_name(self._client, exp_id, run_name)
            run = self._client.create_run(exp_id, run_name=run_name, tags=clean_tags)
            if wanted:  # another training may have taken the same free name meanwhile
                run_name = settle_run_name(self._client, exp_id, run, wanted)
        except MlflowException as e:
            raise TrackingError(f"MLflow at {self.uri}: cannot start a run in experiment {self.experiment!r}: "
                                f"{e}; {FIX_HINT}") from e
        run_id = run.info.run_id
        records = [self._param_record(k, v) for k, v in params.items()]
        try:
            deliver(self._client, run_id, [r for r in records if r is not None], lambda rs: None)
        except MlflowException as e:
            try:
                self._client.set_terminated(run_id, "FAILED")
            except MlflowException:
                pass
            raise TrackingError(f"MLflow at {self.uri}: cannot log the params of run {run_id}: {e}; {FIX_HINT}") from e
        self.run_id, self.run_name, self.experiment_id = run_id, run_name or run.info.run_name, exp_id
        self._pending, self.delivered, self._failures, self._uncertain = {}, 0, 0, False
        self._stopping = self._closed = False
        self._result = None
        self._thread = threading.Thread(target=self._worker, name=f"embedft-mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()
        log.info("MLflow run %s (%s) in experiment %r at %s", self.run_name, run_id, self.experiment, self.uri)
        return run_id

    def end_stale_run(self, run_id: str, status: str = "KILLED") -> None:
        """Close an earlier run that was left RUNNING (its process was killed without warning).

        Called after start_run; a failure is logged, never raised (it must not stop a new run).
        """
        try:
            if self._client.get_run(run_id).info.status == "RUNNING":
                self._client.set_terminated(run_id, status)
                log.info("MLflow run %s was left RUNNING by a killed process; marked %s", run_id, status)
        except Exception as e:  # noqa: BLE001 - bookkeeping of an old run
            log.warning("could not close the earlier MLflow run %s: %s", run_id, e)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Queue metric points (timestamped now); never blocks on or raises because of the server."""
        ts = _now_ms()
        recs = []
        for k, v in metrics.items():
            try:
                value = float(v)
            except (TypeError, ValueError):
                log.warning("metric %s=%r is not a number; not logged", k, v)
                continue
            recs.append({"type": "metric", "key": metric_key(k), "value": value, "timestamp": ts,
                         "step": int(step or 0)})
        self._enqueue(recs)

    def log_params(self, params: dict[str, Any]) -> None:
        """Queue params (flat keys); a changed value of an already logged param is refused with a warning."""
        self._enqueue([r for r in (self._param_record(k, v) for k, v in params.items()) if r is not None])

    def set_tags(self, tags: dict[str, str]) -> None:
        self._enqueue([{"type": "tag", "key": metric_key(k), "value": _value_str(v, MAX_TAG_LEN, f"tag {k}")}
                       for k, v in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact, e.g. the YAML config as `config.yaml`."""
        self._enqueue([{"type": "text", "text": text, "artifact_file": artifact_file}])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file upload (the file must stay in place until end())."""
        self._enqueue([{"type": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path,
                        "is_dir": False}])

    def log_artifacts(self, dir: str | Path, artifact_path: str | None = None) -> None:
        """Queue the upload of a folder's contents under artifact_path."""
        self._enqueue([{"type": "artifact", "path": str(Path(dir).resolve()), "artifact_path": artifact_path,
                        "is_dir": True}])

    def log_input(self, name: str, digest: str, n_rows: int, source: str, context: str) -> None:
        """A dataset input (context: training/evaluation); the digest is the caller's content hash."""
        try:
            local = bool(source) and Path(source).exists()
        except OSError:  # not a path at all (a hub name that is too long for the file system)
            local = False
        self._enqueue([{"type": "input", "name": name[:500], "digest": str(digest)[:MAX_DIGEST_LEN],
                        "n_rows": int(n_rows), "source": str(Path(source).resolve()) if local else source,
                        "source_type": "local" if local else "external", "context": context}])

    @property
    def pending(self) -> int:
        """Records queued and not yet confirmed by the store."""
        with self._cond:
            return len(self._pending)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued record is delivered (True) or timeout passes (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._next_try = min(self._next_try, time.monotonic() + self.flush_interval)
            self._cond.notify_all()
            while self._pending and time.monotonic() < deadline and not self._closed:
                self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            return not self._pending

    def end(self, status: str = "FINISHED") -> bool:
        """Deliver what is queued and close the run; spool it to disk if the store stays away.

        Returns True when everything (records and final status) reached the store.
        """
        if self.run_id is None:
            return True
        if self._result is not None:
            return self._result
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            # A request in flight is bounded by MLFLOW_HTTP_REQUEST_TIMEOUT x (retries + 1).
            self._thread.join(timeout=self.end_timeout + 60)
        deadline = time.monotonic() + self.end_timeout
        delay = 0.5
        while True:
            try:
                with self._cond:
                    batch = list(self._pending.values())
                if batch:
                    deliver(self._client, self.run_id, batch, self._done, check_history=self._uncertain)
                self._client.set_terminated(self.run_id, status)
                ok = True
                break
            except Exception as e:
                if is_permanent(e):
                    log.error("MLflow refused to end run %s as %s: %s", self.run_id, status, e)
                    ok = True  # nothing a later sync could change
                    break
                self._uncertain = True
                if time.monotonic() + delay > deadline:
                    ok = False
                    break
                time.sleep(delay)
                delay = min(delay * 2, 4.0)
        with self._cond:
            self._closed = True
            left = list(self._pending.values())
            self._pending.clear()
            self._cond.notify_all()
        self._result = ok
        if not ok:
            where = self._spool(left, status)  # a disk that refuses it: WriteError, nothing half-written
            log.warning("MLflow at %s is unreachable: %d records of run %s (and its %s status) are saved in %s; "
                        "deliver them later with `embedft runs sync %s`", self.uri, len(left), self.run_id,
                        status, where, self.spool_dir)
        return ok

    # -- internals --------------------------------------------------------------------------

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                return self._client.create_experiment(self.experiment, artifact_location=self._artifact_location(),
                                                      tags=mlflow_ui.experiment_tags())
            except MlflowException:  # created meanwhile by another process (sweep, second shell)
                exp = self._client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {self.experiment!r} at {self.uri} is deleted; restore it "
                                f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or set "
                                "tracking.experiment to another name")
        declare_experiment(self._client, exp)
        return exp.experiment_id

    def _artifact_location(self) -> str | None:
        return artifact_location(self.uri, self.experiment)

    def _param_record(self, key: str, value: Any) -> dict | None:
        k = metric_key(key)
        v = _value_str(value, MAX_PARAM_LEN, f"param {key}")
        old = self._logged_params.get(k)
        if old is not None and old != v:
            log.warning("param %s was logged as %r; MLflow params cannot change, not logging %r", k, old, v)
            return None
        self._logged_params[k] = v
        return {"type": "param", "key": k, "value": v}

    def _enqueue(self, records: list[dict]) -> None:
        if not records:
            return
        if self.run_id is None:
            raise TrackingError("no active run: call start_run() before logging")
        with self._cond:
            if self._closed or self._stopping:
                log.warning("run %s has ended; %d records not logged", self.run_id, len(records))
                return
            for r in records:
                self._seq += 1
                r["seq"] = self._seq
                self._pending[self._seq] = r
            self._cond.notify_all()

    def _done(self, records: list[dict]) -> None:
        with self._cond:
            if self._closed:
                return
            for r in records:
                if self._pending.pop(r["seq"], None) is not None:
                    self.delivered += 1
            self._cond.notify_all()

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    now = time.monotonic()
                    if self._pending and now >= self._next_try:
                        break
                    self._cond.wait(self._next_try - now if self._pending else None)
                if self._stopping:
                    return
                batch = list(self._pending.values())
            try:
                deliver(self._client, self.run_id, batch, self._done, check_history=self._uncertain)
            except Exception as e:  # transient: keep the records, back off, try again
                self._failures += 1
                self._uncertain = True
                wait = min(self.max_backoff, 2.0 ** self._failures)
                if self._failures == 1:
                    log.warning("MLflow at %s did not take run %s's records (%s); keeping them and retrying",
                                self.uri, self.run_id, str(e)[:300])
                with self._cond:
                    self._next_try = time.monotonic() + wait
                continue
            if self._failures:
                log.info("MLflow at %s is back; run %s's queue is delivered", self.uri, self.run_id)
            self._failures = 0
            self._uncertain = False
            with self._cond:
                self._next_try = time.monotonic() + self.flush_interval

    def _spool(self, records: list[dict], status: str) -> Path:
        """Write undelivered records to this run's spool folder for `embedft runs sync`."""
        return write_spool(self.spool_dir / str(self.run_id), records, {
            "run_id": self.run_id, "uri": self.uri, "experiment": self.experiment, "status": status,
            "end_time": _now_ms(), "spooled_at": _dt.datetime.now().isoformat(timespec="seconds")})


def declare_experiment(client, exp) -> None:
    """Give an existing experiment the UI tags of embedft's own (`mlflow_ui.experiment_tags`) that it lacks.

    A tag already there is left alone (the user may have chosen another kind); a store that refuses
    the tag is logged, not raised: the run is tracked all the same.
    """
    from mlflow.exceptions import MlflowException

    for key, value in mlflow_ui.experiment_tags().items():
        if key in exp.tags:
            continue
        try:
            client.set_experiment_tag(exp.experiment_id, key, value)
        except MlflowException as e:
            log.warning("could not tag MLflow experiment %r with %s: %s", exp.name, key, e)


def unique_run_name(client, experiment_id: str, wanted: str) -> str:
    """wanted, or wanted-2, wanted-3, ...: the first name no run of the experiment has (deleted runs included)."""
    taken = {r.info.run_name for r in _runs_named_like(client, experiment_id, wanted)}
    name, n = wanted, 1
    while name in taken:
        n += 1
        name = f"{wanted}-{n}"
    return name


NAMED_AT = "embedft.named_at"  # a run's tag: when (ms) it took its current name (`settle_run_name`)


def settle_run_name(client, experiment_id: str, run, wanted: str) -> str:
    """The name `run` keeps. Two trainings started at once can both find `wanted` free and create runs
    of that name. After creating, the run that took a name first (its NAMED_AT tag, else its start
    time; then the run id) keeps it, and the others move on to the next free name, taking it later
    than whoever holds it already: every process reaches the same verdict from the store."""
    name = run.info.run_name
    for _ in range(100):
        same = [r for r in _runs_named_like(client, experiment_id, name) if r.info.run_name == name]
        first = min(same, key=_named_at, default=run)
        if first.info.run_id == run.info.run_id:
            return name
        name = unique_run_name(client, experiment_id, wanted)
        client.set_tag(run.info.run_id, NAMED_AT, str(time.time_ns() // 1_000_000))  # before the name: never stale
        client.update_run(run.info.run_id, name=name)
    return name


def _named_at(r) -> tuple[int, str]:
    at = r.data.tags.get(NAMED_AT)
    return (int(at) if at and at.isdigit() else r.info.start_time or 0), r.info.run_id


def _runs_named_like(client, experiment_id: str, wanted: str) -> list:
    """The experiment's runs (deleted ones included) whose names start as `wanted` does."""
    from mlflow.entities import ViewType

    # LIKE narrows the search (its wildcards only widen it); a quote would end the filter's string.
    prefix = re.split(r"['\"\\]", wanted, maxsplit=1)[0]
    found, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"attributes.run_name LIKE '{prefix}%'",
                                  run_view_type=ViewType.ALL, max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifact location for a new experiment: next to the database for a SQLite store, else the server's default."""
    # With a bare SQLite store mlflow would put artifacts in ./mlruns of whatever folder we run
    # in (and a ./mlruns folder makes a later `mlflow server` pick the file store); keep them
    # next to the database instead, where `mlflow ui` and `make clean` find them.
    db = _sqlite_path(uri)
    if db is None:
        return None
    name = re.sub(r"[^\w.\-]", "_", experiment)
    if name.isdigit():
        name = f"exp-{name}"
    return (db.parent.resolve() / "mlartifacts" / name).as_uri()


def user_name() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def sync_pending(spool_root: str | Path, uri: str | None = None) -> int:
    """Deliver spooled runs under spool_root (to uri, default each spool's own); returns records delivered.

    Each delivered spool folder is removed. Safe to repeat: points already stored are skipped.
    """
    root = Path(spool_root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "no such folder"
        raise TrackingError(f"{root}: {what}; pass a run folder or its .mlflow-pending folder")
    spools = sorted(p.parent for p in root.rglob(SPOOL_META))
    total = 0
    failed: list[str] = []
    for folder in spools:
        try:
            meta, records = read_spool(folder)
        except (ValueError, KeyError) as e:  # cut short by a kill while spooling, or edited by hand
            failed.append(f"{folder} (damaged spool: {type(e).__name__}: {e}; repair or delete that folder)")
            continue
        target = uri or meta["uri"]
        count = [0]

        def done(rs: list[dict]) -> None:
            count[0] += len(rs)

        try:
            check_reachable(target)
            client = mlflow_client(target)
            deliver(client, meta["run_id"], records, done, check_history=True)
            client.set_terminated(meta["run_id"], meta["status"], end_time=meta.get("end_time"))
        except Exception as e:
            failed.append(f"{folder} ({e})")
            continue
        log.info("delivered %d records of run %s to %s", count[0], meta["run_id"], target)
        total += count[0]
        shutil.rmtree(folder)
    for d in sorted({s.parent for s in spools}, reverse=True):  # drop emptied .mlflow-pending folders
        if d.exists() and d.name == ".mlflow-pending" and not any(d.iterdir()):
            d.rmdir()
    if failed:
        raise TrackingError(f"delivered {total} records, but {len(failed)} spooled run(s) are still pending: "
                            f"{'; '.join(failed)}")
    return total
