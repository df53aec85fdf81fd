"""What every recipe does first: read and check the data, open the tracker, end its run."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedft.config import ExperimentConfig, TrackingConfig
from embedft.data.batches import PairSource, build_pair_source, check_schedule
from embedft.data.examples import Examples, carve_validation, load_splits, retrieval_task
from embedft.errors import ConfigError, DataError, EmbedftError
from embedft.evaluation.tasks import check_tasks
from embedft.tracking.base import NullTracker

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: Examples  # the training split: the kNN index of the final evaluation
    eval: Examples  # read by the final evaluation only
    source: PairSource  # what training draws batches from: `fit`
    report: Any
    fit: Examples | None = None  # the training split less the validation split (train when there is none)
    val: Examples | None = None  # carved out of `train` (train.val_fraction) for model selection


def prepare_data(cfg: ExperimentConfig) -> PreparedData:
    """Read and validate everything a run needs before any model is loaded."""
    from embedft.modeling.families import resolve_model_path
    from embedft.training.losses import build_loss

    _check_extras(cfg)
    build_loss(cfg.loss)  # an unknown loss.name fails now
    resolve_model_path(cfg.model.name)  # a missing folder or an offline hub id fails now, not at the model load
    train_ex, eval_ex, report = load_splits(cfg.data)
    fit_ex, val_ex = carve_validation(train_ex, cfg.train.val_fraction if cfg.train.eval_every_epoch else 0.0,
                                      cfg.data.split_seed)
    if val_ex is not None:
        report.counts["val_rows"] = len(val_ex)
        if val_ex.shape != "labeled" and len(retrieval_task(val_ex)) == 0:
            raise DataError(f"{cfg.data.train}: the validation split carved out of the training data "
                            f"(train.val_fraction={cfg.train.val_fraction}, {len(val_ex)} rows) has no retrieval query "
                            "(no group with two texts, no query/positive row); raise train.val_fraction, or set "
                            "-o train.val_fraction=0 -o train.select_best=false -o train.patience=null")
    src = build_pair_source(fit_ex)
    if cfg.loss.label_weight > 0 and (src.batch_labels is None or src.positives is not None):
        raise ConfigError(f"loss.label_weight={cfg.loss.label_weight} needs grouped data with a label column "
                          f"(data.shape=grouped, data.label_column set; {cfg.data.train} has shape "
                          f"{cfg.data.shape!r}, label column {cfg.data.label_column!r}, which it does not have); set "
                          "data.label_column to the column that holds the categories, or -o loss.label_weight=0 "
                          "(without labels there is no classification in the report either)")
    _warn_unused_mining(cfg, src)
    check_schedule(src, cfg.train, str(cfg.data.train))
    check_tasks(cfg.eval, train_ex, eval_ex)  # an evaluation that cannot run fails now, not after training
    return PreparedData(train_ex, eval_ex, src, report, fit_ex, val_ex)


def _warn_unused_mining(cfg: ExperimentConfig, src: PairSource) -> None:
    """Mining settings changed from their defaults do nothing when the data brings its own negatives
    (pairs with data.negative_columns), or when no negatives are asked for: say so."""
    from dataclasses import fields

    from embedft.config import LossConfig

    defaults = {f.name: f.default for f in fields(LossConfig) if f.name.startswith("mine_")}
    changed = [f"loss.{k}" for k, v in defaults.items() if getattr(cfg.loss, k) != v]
    if not changed:
        return
    if src.negatives is not None:
        log.warning("%s set, but %s has negative columns (data.negative_columns), which are used as they are: "
                    "nothing is mined. Drop data.negative_columns to mine instead", ", ".join(changed), cfg.data.train)
    elif cfg.loss.hard_negatives == 0 and cfg.train.batch_sampling != "similar_groups":
        log.warning("%s set, but loss.hard_negatives=0: nothing is mined. Set loss.hard_negatives (e.g. 2) to mine",
                    ", ".join(changed))


def _check_extras(cfg: ExperimentConfig) -> None:
    """Optional packages (and devices) the config asks for, checked now rather than after training."""
    import importlib.util

    from embedft.modeling.quantization import check_quantization

    check_quantization(cfg.train)  # QLoRA: bitsandbytes and a CUDA GPU
    if cfg.eval.linear_probe and importlib.util.find_spec("sklearn") is None:
        raise ConfigError("eval.linear_probe=true needs scikit-learn (not installed): pip install scikit-learn, "
                          "or set -o eval.linear_probe=false")


def open_tracker(tcfg: TrackingConfig, experiment: str, out_dir: Path):
    """An MLflow tracker (server checked now, before training) or a no-op one."""
    from embedft.tracking import mlflow as tracking

    if not tcfg.enabled:
        return NullTracker()
    uri = tracking.resolve_uri(tcfg)
    tracking.check_reachable(uri)
    return tracking.MlflowTracker(uri, tcfg.experiment or experiment, spool_dir=out_dir / ".mlflow-pending")


def setup_processes(device_name: str, option: str = "train.device"):
    """(this process's device, its place among the run's processes): one process, or under torchrun
    the process group joined (gloo on CPU, NCCL on GPU) and, with several GPUs, the rank's own GPU."""
    from embedft import distributed
    from embedft.modeling.runtime import resolve_device

    return distributed.place(resolve_device(device_name, option))


@contextlib.contextmanager
def ending(tracker):
    """End the tracker's run as FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED, however the block ends."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        try:
            tracker.end(status)
        except EmbedftError as e:  # e.g. a spool the disk refused
            if status == "FINISHED":
                raise
            log.error("%s", e)  # the block's own error, raised on from here, is the one the CLI shows
