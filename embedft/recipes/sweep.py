"""The sweep recipe: every point of a grid of overrides trained as a child run under one parent."""

from __future__ import annotations

import logging
from typing import Any

from embedft import distributed
from embedft.config import ExperimentConfig
from embedft.errors import ConfigError
from embedft.recipes.common import ending, open_tracker
from embedft.recipes.train import run_train
from embedft.tracking import ui as mlflow_ui
from embedft.tracking.base import NullTracker

log = logging.getLogger(__name__)


def parse_sweeps(sweeps: tuple[str, ...] | list[str]) -> list[list[str]]:
    """['lora.r=8,16', 'train.lr=1e-4,3e-4'] -> the grid as lists of overrides."""
    import itertools

    from embedft.errors import ConfigError

    axes = []
    for s in sweeps:
        if "=" not in s:
            raise ConfigError(f"--sweep {s!r}: expected key=v1,v2,..., e.g. --sweep lora.r=8,16,32")
        key, values = s.split("=", 1)
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ConfigError(f"--sweep {s!r}: no values given")
        axes.append([f"{key.strip()}={v}" for v in vals])
    return [list(p) for p in itertools.product(*axes)]


def run_sweep(cfg: ExperimentConfig, config_path: str, overrides: tuple[str, ...], sweeps: tuple[str, ...],
              progress: bool = True) -> list[dict[str, Any]]:
    """Train every grid point as a child run under one parent MLflow run."""
    from dataclasses import replace

    from embedft.config import load_config

    grid = parse_sweeps(sweeps)
    points = []
    for point in grid:  # validate the whole grid before training anything
        suffix = "-".join(p.split("=", 1)[0].rsplit(".", 1)[-1] + p.split("=", 1)[1] for p in point)
        child = load_config(config_path, tuple(overrides) + tuple(point))
        # Children keep the parent's MLflow experiment; only the run (and its folder) is renamed.
        points.append(replace(child, name=f"{cfg.name}-{suffix}",
                              tracking=replace(child.tracking, experiment=cfg.tracking.experiment or cfg.name)))
    if len({p.output_dir for p in points}) < len(points):  # each point would replace the last one's run folder
        raise ConfigError(f"train.output_dir={cfg.train.output_dir!r} gives every --sweep point the same run folder, "
                          "so each would replace the one before; put {name} in it (e.g. runs/{name}), each point's "
                          "name being <name>-<key><value>", ("train.output_dir",))
    main = distributed.from_env().is_main  # under torchrun, rank 0 alone tracks (the process group joins later)
    tracker = open_tracker(cfg.tracking, cfg.name, cfg.output_dir) if main else NullTracker()
    parent = tracker.start_run(run_name=f"{cfg.name}-sweep", params={"sweep": " x ".join(sweeps)},
                               tags={"embedft.sweep": "parent"})
    out = []
    with ending(tracker):
        for child in points:
            s = run_train(child, progress=progress, parent_run_id=parent)
            out.append({"name": child.name, **s})
        if main:
            _log_best_child(tracker, out)
    return out


def _log_best_child(tracker, children: list[dict[str, Any]]) -> None:
    """The sweep parent carries its best child's evaluation (by its primary key figure) and names that child."""
    top = mlflow_ui.best(children)
    if top is None:
        return
    tracker.log_metrics({k: v for k, v in top["metrics"].items() if k.startswith(mlflow_ui.EVALUATION_PREFIXES)},
                        step=0)
    tracker.set_tags({"embedft.best_run_id": top.get("run_id") or "", "embedft.best_run": top.get("run_name") or top["name"]})
