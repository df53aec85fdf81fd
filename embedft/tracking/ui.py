"""What embedft writes so the MLflow UI shows its runs well: pure functions, no mlflow import.

Checked against MLflow 3.17's UI (`make ui-check` opens it in Chromium; docs/mlflow-ui.md):

- An experiment's kind is the experiment tag `mlflow.experimentKind`; embedft declares its
  experiments `custom_model_development` ("Machine learning"). MLflow 3.17 itself opens an
  experiment on the GenAI overview unless the sidebar switch says "Model training" (remembered
  by the browser) or the link carries `workflowType=machine_learning`, as `runs_url` links do.
- The chart view draws a metric as a bar chart when every run's latest value of it is at step 0,
  else as a line chart, and groups charts into sections by the key's first path part, in
  code-point order: final figures are logged at step 0, and the key figures under `_key/`,
  which sorts before every lower-case section.
- The runs table shows no metric column until one is chosen; a saved view (an experiment tag
  `mlflow.sharedViewState.<id>` holding {name, createdAt, state}) chooses them, and is listed
  under the runs page's "Views". `runs_url` opens it.
"""

from __future__ import annotations

import json
import re
import time
from typing import Iterable
from urllib.parse import quote

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
SAVED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
KEY_FIGURES_VIEW = "embedft-key-figures"
UI_ADDRESS = "http://127.0.0.1:5000"  # what `make ui` serves a SQLite store on
MAX_KEY_LEN = 250  # mlflow.utils.validation's limit, restated so importing this module stays cheap
_BAD_KEY_CHARS = re.compile(r"[^\w.\- /]")


def metric_key(name: str) -> str:
    """The key MLflow accepts for a metric/param/tag name: `recall@10` -> `recall_at_10`."""
    k = _BAD_KEY_CHARS.sub("_", str(name).replace("@", "_at_"))
    k = "/".join(p for p in k.split("/") if p not in ("", ".", ".."))
    return k[:MAX_KEY_LEN] or "_"

# The figures a run is judged by, in order of preference, and their names under _key/.
HEADLINE = (("retrieval/recall@10", "recall@10"), ("classification/macro_f1", "macro_f1"))
KEY_PREFIX = "_key/"
GAIN_PREFIX = "gain/"
EVALUATION_PREFIXES = ("adapted/", "base/", GAIN_PREFIX, KEY_PREFIX)  # what final_metrics logs
# Timings and counts are not figures a gain means anything for (evaluate.compare leaves them out too).
_NOT_QUALITY = ("/seconds", "/qps", "/build_s", "n_queries", "unseen_label_queries")


def gains(adapted: dict[str, float], base: dict[str, float] | None) -> dict[str, float]:
    """`gain/<metric>` = adapted - base for each quality figure both evaluations have."""
    if not base:
        return {}
    return {f"{GAIN_PREFIX}{k}": float(v) - float(base[k]) for k, v in adapted.items()
            if k in base and not k.endswith(_NOT_QUALITY)}


def key_figures(adapted: dict[str, float], base: dict[str, float] | None) -> dict[str, float]:
    """The headline figures under `_key/` (first in the UI): adapted recall@10 and macro-F1, and
    their gain over the base model (`_key/recall@10_gain`), for the tasks that were evaluated."""
    out = {}
    for metric, short in HEADLINE:
        if metric in adapted:
            out[f"{KEY_PREFIX}{short}"] = float(adapted[metric])
            if base and metric in base:
                out[f"{KEY_PREFIX}{short}_gain"] = float(adapted[metric]) - float(base[metric])
    return out


def final_metrics(adapted: dict[str, float] | None, base: dict[str, float] | None) -> dict[str, float]:
    """A run's final evaluation as logged: `adapted/`, `base/`, `gain/` and `_key/` figures."""
    out = {f"adapted/{k}": v for k, v in (adapted or {}).items()}
    out.update({f"base/{k}": v for k, v in (base or {}).items()})
    if adapted:
        out.update(gains(adapted, base))
        out.update(key_figures(adapted, base))
    return out


def primary_metric(metrics: dict[str, float]) -> str | None:
    """The key figure runs are ranked by (`_key/recall@10`, else `_key/macro_f1`), if the metrics have one."""
    for _, short in HEADLINE:
        if f"{KEY_PREFIX}{short}" in metrics:
            return f"{KEY_PREFIX}{short}"
    return None


def best(summaries: Iterable[dict]) -> dict | None:
    """The run summary (with a "metrics" dict) whose primary key figure is highest (the first one on a
    tie); None when no run has one. Runs are only compared on the same figure: the first run's."""
    scored = [s for s in summaries if primary_metric(s.get("metrics") or {})]
    if not scored:
        return None
    key = primary_metric(scored[0]["metrics"])
    return max((s for s in scored if key in s["metrics"]), key=lambda s: s["metrics"][key])


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"


def key_figures_view(created_ms: int | None = None) -> str:
    """The saved view "embedft: key figures" of the runs table: the `_key/` columns next to the run names."""
    columns = [_column("metrics", metric_key(f"{KEY_PREFIX}{short}{suffix}"))
               for _, short in HEADLINE for suffix in ("", "_gain")]
    columns += [_column("attributes", "Dataset")]
    created = int(time.time() * 1000) if created_ms is None else created_ms
    state = {"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False}
    return json.dumps({"name": "embedft: key figures", "createdAt": created, "updatedAt": created,
                       "state": json.dumps(state)})


def experiment_tags() -> dict[str, str]:
    """The tags embedft's experiments carry for the UI: their kind and the key-figures view."""
    return {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND, SAVED_VIEW_TAG_PREFIX + KEY_FIGURES_VIEW: key_figures_view()}


def ui_address(tracking_uri: str) -> str:
    """Where the UI of a store is served: a tracking server serves its own; a SQLite store is `make ui`'s."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else UI_ADDRESS


def runs_url(address: str, experiment_id: str, run_id: str | None = None) -> str:
    """A link that opens the experiment's runs (with the key-figures view), or one run, as model training."""
    base = f"{address.rstrip('/')}/#/experiments/{quote(str(experiment_id))}"
    if run_id:
        return f"{base}/runs/{quote(run_id)}?workflowType=machine_learning"
    return f"{base}/runs?workflowType=machine_learning&viewStateShareKey={KEY_FIGURES_VIEW}"
