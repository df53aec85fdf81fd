"""What the recipes log to: the `Tracker` protocol, and `NullTracker` for runs without tracking.

The recipes and the training loop see only this protocol; `embedft.tracking.mlflow.MlflowTracker`
is the implementation that talks to MLflow (the only module that imports mlflow to write).
A new tracker implements these methods and is returned by `recipes.common.open_tracker`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    """A run's record: params, tags, per-step metrics, artifacts; ended once with a status."""

    run_id: str | None

    def start_run(self, run_name: str | None, params: dict[str, Any], tags: dict[str, str],
                  parent_run_id: str | None = None) -> str | None:
        """Open the run; returns its id (None when nothing is recorded)."""

    def end_stale_run(self, run_id: str, status: str = "KILLED") -> None:
        """Close an earlier run left RUNNING (a killed process) that this one resumes."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_artifacts(self, dir: str | Path, artifact_path: str | None = None) -> None: ...

    def log_input(self, name: str, digest: str, n_rows: int, source: str, context: str) -> None: ...

    def links(self) -> dict[str, str]:
        """The run's name and the links that open it and its experiment's runs in a UI ({} untracked)."""

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait up to timeout seconds for queued records; True when none is left."""

    def end(self, status: str = "FINISHED") -> bool:
        """End the run (FINISHED, FAILED or KILLED); True when everything was delivered."""


class NullTracker:
    """Tracking disabled: the Tracker protocol, doing nothing."""

    run_id = None
    pending = 0
    delivered = 0

    def __enter__(self) -> "NullTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass

    def start_run(self, run_name: str | None, params: dict[str, Any], tags: dict[str, str],
                  parent_run_id: str | None = None) -> None:
        return None

    def end_stale_run(self, run_id: str, status: str = "KILLED") -> None:
        pass

    def links(self) -> dict[str, str]:
        return {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, dir: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_input(self, name: str, digest: str, n_rows: int, source: str, context: str) -> None:
        pass

    def flush(self, timeout: float = 30.0) -> bool:
        return True

    def end(self, status: str = "FINISHED") -> bool:
        return True
