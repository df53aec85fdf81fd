"""Reading the MLflow store back: the runs table (`embedft runs list`), a run's adapter
(`eval --run` / `export --run`) and the model registry (`export --register`).

With `embedft.tracking.mlflow`, which writes the runs, the only modules that import mlflow (lazily).
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
from pathlib import Path
from typing import Any, Iterable

from embedft.errors import TrackingError
from embedft.tracking.mlflow import (
    artifact_location,
    check_reachable,
    configure_http,
    metric_key,
    mlflow_client,
    require_store,
    user_name,
)

log = logging.getLogger(__name__)
MAIN_PARAMS = ("model.name", "lora.r", "train.lr", "train.epochs", "train.batch_size", "loss.temperature")
# recall@10 is standard recall (|top 10 ∩ positives| / |positives|); r_cap@10 divides by min(|positives|, 10).
# Runs logged before issue 29 hold R_cap under recall@10 and have no r_cap@10: an empty r_cap column marks them.
MAIN_METRICS = ("adapted/retrieval/recall@10", "base/retrieval/recall@10", "adapted/retrieval/r_cap@10",
                "adapted/retrieval/mrr@10", "adapted/classification/macro_f1", "train/total_seconds")


DEFAULT_COLUMNS = ("run_id", "name", "status", "start", "params.model.name", "params.lora.r", "params.train.lr",
                   "metrics.adapted/retrieval/recall_at_10", "metrics.base/retrieval/recall_at_10",
                   "metrics.adapted/retrieval/r_cap_at_10")


def _order_by(sort_by: str) -> str:
    kind, _, key = sort_by.partition(".")
    if kind == "metrics":
        key = metric_key(key)
    if kind in ("metrics", "params", "tags"):
        return f"{kind}.`{key}` DESC"
    return f"{sort_by} DESC"


def list_runs(uri: str, experiment: str, sort_by: str = "metrics.adapted/retrieval/recall@10",
              max_results: int = 50) -> list[dict]:
    """Flat rows for a terminal table: id, name, status, start, main params (params.*), main metrics (metrics.*)."""
    check_reachable(uri)
    require_store(uri)
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"no MLflow experiment {experiment!r} at {uri}; train one first, or pass the "
                            "experiment name (tracking.experiment, by default the config's name)")
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_runs([exp.experiment_id], order_by=[_order_by(sort_by)], max_results=max_results)
    except MlflowException as e:  # a sort key MLflow cannot parse
        raise TrackingError(f"--sort {sort_by}: {e.message}; sort by metrics.<name>, params.<name>, tags.<name> or "
                            "a run attribute (start_time, end_time, run_name, status)") from e
    _check_sort_key(found, sort_by, experiment)
    metric_keys = [metric_key(m) for m in MAIN_METRICS]
    if sort_by.startswith("metrics."):
        metric_keys.append(metric_key(sort_by[len("metrics."):]))
    rows = []
    for run in found:
        info, data = run.info, run.data
        row: dict[str, Any] = {
            "run_id": info.run_id, "name": info.run_name, "status": info.status,
            "start": _dt.datetime.fromtimestamp(info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
            if info.start_time else None,
            "duration_s": (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None,
            "parent_run_id": data.tags.get("mlflow.parentRunId"),
        }
        row.update({f"params.{k}": data.params.get(k) for k in MAIN_PARAMS})
        row.update({f"metrics.{k}": data.metrics.get(k) for k in metric_keys})
        rows.append(row)
    return rows


def _check_sort_key(runs: list, sort_by: str, experiment: str) -> None:
    # A misspelt --sort would otherwise sort by nothing and show a column of '-'.
    kind, _, key = sort_by.partition(".")
    if not runs or kind not in ("metrics", "params"):
        return
    key = metric_key(key) if kind == "metrics" else key
    present = {k for run in runs for k in getattr(run.data, kind)}
    if key not in present:
        known = ", ".join(f"{kind}.{k}" for k in sorted(present)[:12]) + (" ..." if len(present) > 12 else "")
        raise TrackingError(f"--sort {sort_by}: no run of experiment {experiment!r} has {kind[:-1]} {key!r}; "
                            f"choose one of: {known}")


def runs_columns(sort_by: str) -> list[str]:
    """The default table columns, plus the metric the runs are sorted by when it is not one of them."""
    cols = list(DEFAULT_COLUMNS)
    if sort_by.startswith("metrics."):
        col = "metrics." + metric_key(sort_by[len("metrics."):])
        if col not in cols:
            cols.append(col)
    return cols


def format_runs_table(rows: list[dict], columns: Iterable[str] | None = None) -> str:
    """A plain-text table of list_runs rows; floats to 4 places, missing values as '-'."""
    cols = list(columns or DEFAULT_COLUMNS)
    if not rows:
        return "(no runs)"

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    headers = [c.split(".", 1)[1] if c.startswith(("params.", "metrics.")) else c for c in cols]
    body = [[cell(r.get(c)) for c in cols] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in cols]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(b) for b in body])


def download_adapter(uri: str, run_id: str, dst: str | Path) -> Path:
    """Download run_id's `adapter/` artifact folder into dst, with its `eval/report.md` when the run
    has one (laid out as a run folder, so an export's model card finds it); returns the adapter folder."""
    from mlflow.exceptions import MlflowException

    check_reachable(uri)
    require_store(uri)
    client = mlflow_client(uri)
    try:
        client.get_run(run_id)
    except MlflowException as e:
        raise TrackingError(f"MLflow run {run_id} not found at {uri}: {e}; check the id (`embedft runs list`) "
                            "and tracking.uri / MLFLOW_TRACKING_URI") from e
    if not client.list_artifacts(run_id, "adapter"):
        raise TrackingError(f"MLflow run {run_id} at {uri} has no adapter/ artifact (it failed, was an eval run, "
                            "or its records are still spooled: `embedft runs sync`); pass --adapter DIR instead")
    Path(dst).mkdir(parents=True, exist_ok=True)
    if any(f.path == "eval/report.md" for f in client.list_artifacts(run_id, "eval")):
        (Path(dst) / "eval").mkdir(exist_ok=True)  # a file is downloaded into the folder given, by its own name
        client.download_artifacts(run_id, "eval/report.md", str(Path(dst) / "eval"))
    return Path(client.download_artifacts(run_id, "adapter", str(dst)))


REGISTER_ARTIFACT_PATH = "registered_model"
REGISTER_METRIC_PREFIXES = ("adapted/", "base/")
# embedft's own files of an export, kept next to the re-saved model so `embedft verify` works on a download.
_EXPORT_EXTRAS = ("embedft_export.json", "probes.json", "probe_embeddings.npy", "README.md")


def register_model(uri: str, model_dir: str | Path, name: str, run_id: str | None = None,
                   metrics: dict[str, float] | None = None, experiment: str = "embedft-exports") -> dict:
    """Register an `embedft export` folder in the MLflow model registry as a sentence-transformers model.

    The export is saved with MLflow's sentence_transformers flavor and logged as artifacts of the
    training run `run_id` under `registered_model/` (so the version links to the run it came from);
    when run_id is None or not in this store, a new run in `experiment` holds them instead. Then
    a version of registered model `name` (created if absent) is made from those artifacts, with the
    metrics as version tags and a description line. metrics=None: the linked run's final
    `adapted/*` and `base/*` metrics. Returns {"name", "version", "run_id", "source"}.
    """
    import tempfile

    from mlflow.exceptions import MlflowException

    model_dir = Path(model_dir)
    if not (model_dir / "modules.json").is_file():
        raise TrackingError(f"{model_dir} is not a sentence-transformers folder (no modules.json); "
                            "make one with `embedft export`")
    check_reachable(uri)
    configure_http()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    where = f"MLflow at {uri}"
    try:
        run = _existing_run(client, run_id)
        created = run is None
        if created:
            if run_id:
                log.warning("MLflow run %s is not in %s; registering %s from a new run in experiment %r",
                            run_id, uri, model_dir, experiment)
            run = _register_run(client, uri, experiment, name, model_dir)
        elif metrics is None:
            metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(REGISTER_METRIC_PREFIXES)}
        rid = run.info.run_id
        # A second registration from the same run gets its own folder: overwriting registered_model/
        # would silently change what the earlier version points to.
        artifact_path, n = REGISTER_ARTIFACT_PATH, 1
        while client.list_artifacts(rid, artifact_path):
            n += 1
            artifact_path = f"{REGISTER_ARTIFACT_PATH}_{n}"
        try:
            with tempfile.TemporaryDirectory(prefix="embedft-register-") as tmp:
                local = Path(tmp) / "model"
                _save_flavor(model_dir, local)
                client.log_artifacts(rid, str(local), artifact_path)
        except BaseException:
            if created:
                client.set_terminated(rid, "FAILED")
            raise
        if created:
            client.set_terminated(rid, "FINISHED")
        source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
        tags = {metric_key(k): repr(float(v)) for k, v in sorted((metrics or {}).items())}
        desc = f"embedft export {model_dir.resolve()} from MLflow run {rid}"
        if tags:
            desc += "; " + ", ".join(f"{k}={float(v):.4f}" for k, v in tags.items())
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        mv = client.create_model_version(name, source, run_id=rid, tags=tags, description=desc)
    except MlflowException as e:
        raise TrackingError(f"{where}: cannot register {model_dir} as model {name!r}: {e}; check tracking.uri / "
                            "MLFLOW_TRACKING_URI (a running server or a writable SQLite file)") from e
    log.info("registered %s as %s version %s (run %s, %s)", model_dir, name, mv.version, rid, source)
    return {"name": name, "version": int(mv.version), "run_id": rid, "source": source}


def _existing_run(client, run_id: str | None):
    """run_id's run, or None when there is no id, no such run in this store, or it is deleted."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return None if run.info.lifecycle_stage == "deleted" else run


def _register_run(client, uri: str, experiment: str, name: str, model_dir: Path):
    """A new run in `experiment` to hold a registered export whose training run is not in this store."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            exp_id = client.create_experiment(experiment, artifact_location=artifact_location(uri, experiment))
        except MlflowException:  # created meanwhile
            exp_id = client.get_experiment_by_name(experiment).experiment_id
    elif exp.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow experiment {experiment!r} at {uri} is deleted; restore it "
                            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or pick another")
    else:
        exp_id = exp.experiment_id
    tags = {"mlflow.source.name": "embedft", "mlflow.source.type": "LOCAL", "mlflow.user": user_name(),
            "embedft.export_dir": str(model_dir.resolve())}
    return client.create_run(exp_id, run_name=f"register-{name}", tags=tags)


def _save_flavor(model_dir: Path, dst: Path) -> None:
    """Save the export with mlflow.sentence_transformers into dst (with embedft's probe files beside the weights)."""
    import mlflow.sentence_transformers as mst
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    # Explicit requirements: inferring them starts a subprocess that loads the model again (slow).
    mst.save_model(model, str(dst), pip_requirements=mst.get_default_pip_requirements())
    data = dst / mst.SENTENCE_TRANSFORMERS_DATA_PATH
    for f in _EXPORT_EXTRAS:
        if (model_dir / f).is_file():
            shutil.copy2(model_dir / f, data / f)


def registered_version_run(uri: str, source: str) -> str:
    """The id of the training run a registered model version (models:/NAME/VERSION, @ALIAS or /latest) links to."""
    ref = source[len("models:/"):].strip("/")
    if "@" in ref:
        name, _, alias = ref.partition("@")
        version = None
    else:
        name, _, version = ref.rpartition("/")
        alias = None
    if not name or not (alias or version):
        raise TrackingError(f"adapter source {source!r}: write models:/NAME/VERSION, models:/NAME/latest or "
                         "models:/NAME@ALIAS")
    check_reachable(uri)
    require_store(uri)
    client = mlflow_client(uri)
    from mlflow.exceptions import MlflowException

    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            found = client.search_model_versions(f"name = '{name}'")
            if not found:
                raise TrackingError(f"{source}: no registered model {name!r} at {uri} (`embedft export --register "
                                 f"{name}` registers one)")
            mv = max(found, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, version)
    except MlflowException as e:
        raise TrackingError(f"{source}: not found in the model registry at {uri} ({e.message}); check the name and "
                         "version, and MLFLOW_TRACKING_URI") from e
    if not mv.run_id:
        raise TrackingError(f"{source} links to no MLflow run, so its adapter cannot be found; serve the adapter "
                         "folder instead")
    return mv.run_id
