"""Where a served adapter comes from: `--adapter NAME=SOURCE` and `POST /v1/adapters` sources.

SOURCE is one of
- a folder: an adapter folder (runs/<name>/adapter) or a run folder holding one (runs/<name>);
- `runs:/RUN_ID`: the adapter artifact of an MLflow run (as `embedft eval --run` / `export --run`);
- `models:/NAME/VERSION` (or `models:/NAME@ALIAS`, `models:/NAME/latest`): a version of a model
  registered with `embedft export --register`, served through the training run it links to
  (the registry holds the merged export; the run holds the adapter).

MLflow sources use the store `embedft export --run` reads: $MLFLOW_TRACKING_URI, else
sqlite:///mlflow.db in the working directory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from embedft.serving.errors import ServeError


def parse_adapter_option(value: str) -> tuple[str, str]:
    """'NAME=SOURCE' -> (NAME, SOURCE)."""
    name, sep, source = value.partition("=")
    if not sep or not name.strip() or not source.strip():
        raise ServeError(f"--adapter {value!r}: write NAME=SOURCE, e.g. --adapter products=runs/default/adapter, "
                         "--adapter support=runs:/<run id> or --adapter faq=models:/faq-encoder/3")
    return name.strip(), source.strip()


def is_mlflow_source(source: str) -> bool:
    return source.startswith(("runs:/", "models:/"))


def resolve_source(source: str, workdir: str | Path | None = None, uri: str | None = None) -> Path:
    """A local adapter folder for SOURCE; MLflow artifacts are downloaded under `workdir`
    (a fresh temporary folder when None: the caller may delete it once the adapter is loaded)."""
    if not is_mlflow_source(source):
        p = Path(source).expanduser()
        if not p.exists():
            raise ServeError(f"adapter source {source!r}: no such folder; give an adapter folder "
                             "(runs/<name>/adapter), a run folder, runs:/RUN_ID or models:/NAME/VERSION")
        if p.is_dir() and not (p / "adapter_config.json").exists() and (p / "adapter").is_dir():
            return p / "adapter"  # a run folder
        return p
    from embedft.config import TrackingConfig
    from embedft.tracking import mlflow as tracking
    from embedft.tracking import runs

    uri = uri or tracking.resolve_uri(TrackingConfig())
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="embedft-serve-"))
    if source.startswith("runs:/"):
        run_id = source[len("runs:/"):].strip("/").split("/")[0]
        if not run_id:
            raise ServeError(f"adapter source {source!r}: write runs:/RUN_ID (`embedft runs list` shows the ids)")
        return runs.download_adapter(uri, run_id, workdir)
    run_id = registered_version_run(uri, source)
    try:
        return runs.download_adapter(uri, run_id, workdir)
    except tracking.TrackingError as e:
        raise ServeError(f"{source} links to MLflow run {run_id}, whose adapter cannot be served: {e}") from e


def registered_version_run(uri: str, source: str) -> str:
    """The id of the training run a registered model version (models:/NAME/VERSION, @ALIAS or /latest) links to."""
    from embedft.errors import TrackingError
    from embedft.tracking import runs

    try:
        return runs.registered_version_run(uri, source)
    except TrackingError as e:  # a source the server cannot serve: refused at start, or a 400 for POST /v1/adapters
        raise ServeError(str(e)) from e
