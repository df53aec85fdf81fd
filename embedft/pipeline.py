"""The only place the stages are wired together: config -> data -> model -> train -> eval -> tracking."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedft.atomic import replace_dir, temp_sibling
from embedft.config import ConfigError, ExperimentConfig, TrackingConfig, flatten, to_dict, to_yaml
from embedft.batches import PairSource, build_pair_source, check_schedule
from embedft.data import DataError, Examples, load_splits, retrieval_task
from embedft.evaluate import check_tasks
from embedft import mlflow_ui

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: Examples
    eval: Examples
    source: PairSource
    report: Any


def prepare_data(cfg: ExperimentConfig) -> PreparedData:
    """Read and validate everything a run needs before any model is loaded."""
    _check_extras(cfg)
    train_ex, eval_ex, report = load_splits(cfg.data)
    src = build_pair_source(train_ex)
    if cfg.loss.label_weight > 0 and (src.batch_labels is None or src.positives is not None):
        raise ConfigError(f"loss.label_weight={cfg.loss.label_weight} needs grouped data with a label column "
                          f"(data.shape=grouped, data.label_column set; {cfg.data.train} has shape "
                          f"{cfg.data.shape!r}, label column {cfg.data.label_column!r}); set -o loss.label_weight=0")
    check_schedule(src, cfg.train, str(cfg.data.train))
    check_tasks(cfg.eval, train_ex, eval_ex)  # an evaluation that cannot run fails now, not after training
    return PreparedData(train_ex, eval_ex, src, report)


def _check_extras(cfg: ExperimentConfig) -> None:
    """Optional packages the config asks for, checked now rather than after training."""
    import importlib.util

    if cfg.eval.linear_probe and importlib.util.find_spec("sklearn") is None:
        raise ConfigError("eval.linear_probe=true needs scikit-learn (not installed): pip install scikit-learn, "
                          "or set -o eval.linear_probe=false")


def open_tracker(tcfg: TrackingConfig, experiment: str, out_dir: Path):
    """An MLflow tracker (server checked now, before training) or a no-op one."""
    from embedft import tracking

    if not tcfg.enabled:
        return tracking.NullTracker()
    uri = tracking.resolve_uri(tcfg)
    tracking.check_reachable(uri)
    return tracking.Tracker(uri, tcfg.experiment or experiment, spool_dir=out_dir / ".mlflow-pending")


def build_val_set(encoder, eval_ex: Examples, max_queries: int, seed: int):
    """Per-epoch validation: a capped retrieval task and a few loss batches from the eval split."""
    from embedft.train import ValSet

    task = retrieval_task(eval_ex, max_queries=max_queries, seed=seed) if eval_ex.shape != "labeled" else None
    try:
        loss_src = build_pair_source(eval_ex)
    except DataError:
        loss_src = None
    if task is None or len(task) == 0:
        return None
    return ValSet(encoder.tokenize(task.queries, is_query=True), encoder.tokenize(task.corpus),
                  task.positives, task.self_ids, loss_source=loss_src)


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
        tracker.end(status)


RUN_ID_FILE = ".mlflow-run-id"  # in the run folder: the MLflow run a --resume continues from


def run_train(cfg: ExperimentConfig, resume: bool = False, progress: bool = True,
              parent_run_id: str | None = None) -> dict[str, Any]:
    """Train one experiment end to end; returns the run summary (paths and metrics)."""
    import torch

    from embedft.checkpoint import check_resumable, require_checkpoint, run_identity
    from embedft.evaluate import check_indexes, evaluate_encoder, format_table, compare, write_report
    from embedft.models import load_encoder
    from embedft.lora import apply_lora, load_adapter, lora_settings, save_adapter
    from embedft.models import resolve_device
    from embedft.train import base_dtype, seed_everything, train

    data = prepare_data(cfg)
    out = cfg.output_dir
    if resume:  # nothing to resume: refused before the run folder is made or a model loaded
        require_checkpoint(out / "checkpoint")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder should be, no permission, read-only disk
        raise ConfigError(f"train.output_dir: cannot make the run folder {out} ({e.strerror}: {e.filename}); "
                          "set -o train.output_dir to a folder you can write") from None
    tracker = open_tracker(cfg.tracking, cfg.name, out)
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    encoder = load_encoder(cfg.model, device, cfg.lora)
    log.info("model %s: family=%s pooling=%s on %s", cfg.model.name, encoder.spec.family, encoder.spec.pooling, device)
    check_indexes(cfg.eval, encoder.spec.hidden_size, data.train, data.eval)
    if resume:  # refused now, not after the base model's evaluation
        check_resumable(out / "checkpoint", run_identity(encoder.spec, lora_settings(encoder, cfg.lora), data.source,
                                                         cfg.train, cfg.loss))

    base_eval = evaluate_encoder(encoder, data.train, data.eval, cfg.eval, device, progress) \
        if cfg.eval.compare_base else None
    seed_everything(cfg.train.seed)  # LoRA init does not depend on whether the base was evaluated
    dtype = base_dtype(cfg.train.base_dtype, device)
    if dtype != torch.float32:
        log.info("frozen base weights in %s (train.base_dtype=%s)", dtype, cfg.train.base_dtype)
        encoder.backbone.to(dtype)  # peft keeps the adapter weights in fp32
    apply_lora(encoder, cfg.lora)
    val = build_val_set(encoder, data.eval, cfg.train.val_max_queries, cfg.train.seed)

    tags = _run_tags(cfg, encoder.spec, device)
    previous = (out / RUN_ID_FILE).read_text().strip() if resume and (out / RUN_ID_FILE).is_file() else None
    if previous:
        tags["embedft.resumed_from"] = previous
    run_id = tracker.start_run(run_name=cfg.tracking.run_name or cfg.name, params=flatten(to_dict(cfg)),
                               tags=tags, parent_run_id=parent_run_id)
    if previous:
        tracker.end_stale_run(previous)  # a run killed without warning (SIGKILL) stays RUNNING otherwise
    if run_id:
        (out / RUN_ID_FILE).write_text(run_id)
    with ending(tracker):
        tracker.log_text(to_yaml(cfg), "config.yaml")
        for role, ex in (("train", data.train), ("eval", data.eval)):
            tracker.log_input(name=f"{cfg.name}-{role}", digest=ex.digest(), n_rows=len(ex), source=ex.source,
                              context="training" if role == "train" else "evaluation")
        tracker.log_metrics({f"data/{k}": float(v) for k, v in data.report.counts.items()}, step=0)

        result = train(encoder, data.source, cfg.train, cfg.loss, out, val=val, sink=tracker, resume=resume,
                       progress=progress)

        adapter_dir = out / "adapter"
        tmp = temp_sibling(adapter_dir)
        save_adapter(encoder, tmp, {"experiment": cfg.name, "config": to_dict(cfg),
                                    "data": {"train_digest": data.train.digest(), "eval_digest": data.eval.digest(),
                                             "train_rows": len(data.train), "eval_rows": len(data.eval)},
                                    "mlflow_run_id": run_id})
        replace_dir(tmp, adapter_dir)
        (out / "config.yaml").write_text(to_yaml(cfg))

        if dtype != torch.float32:
            # Report what `embedft eval` and the export load: the saved adapter on the fp32 base.
            encoder = load_adapter(load_encoder(cfg.model, device, cfg.lora), adapter_dir)
        adapted_eval = evaluate_encoder(encoder, data.train, data.eval, cfg.eval, device, progress)
        report_dir = write_report(out / "eval", base_eval, adapted_eval,
                                  {"name": cfg.name, "model": cfg.model.name, "adapter": str(adapter_dir),
                                   "eval_data": data.eval.source, "train_steps": result.steps})
        final = mlflow_ui.final_metrics(adapted_eval.metrics, base_eval.metrics if base_eval else None)
        final.update({"train/total_seconds": result.train_seconds, "train/avg_samples_per_s": result.samples_per_s,
                      "train/avg_tokens_per_s": result.tokens_per_s})
        tracker.log_metrics(final, step=0)  # one value per run: at step 0 the MLflow UI draws it as a bar, not a line
        plots = _make_plots(out / "plots", result, base_eval, adapted_eval)
        tracker.log_artifacts(str(adapter_dir), "adapter")
        tracker.log_artifacts(str(report_dir), "eval")
        for p in plots:
            tracker.log_artifact(str(p), "plots")
        summary = {"run_id": run_id, **_ui_links(tracker), "output_dir": str(out), "adapter": str(adapter_dir),
                   "report": str(report_dir),
                   "steps": result.steps, "train_seconds": result.train_seconds,
                   "samples_per_s": result.samples_per_s, "metrics": final,
                   "table": format_table(compare(base_eval.metrics if base_eval else None, adapted_eval.metrics))}
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "table"}, indent=2))
        return summary


def _ui_links(tracker) -> dict[str, str]:
    """The run's name and the links that open it and its experiment's runs in the MLflow UI (when tracked)."""
    if not tracker.run_id:
        return {}
    address = mlflow_ui.ui_address(tracker.uri)
    return {"run_name": tracker.run_name, "run_url": mlflow_ui.runs_url(address, tracker.experiment_id, tracker.run_id),
            "experiment_url": mlflow_ui.runs_url(address, tracker.experiment_id)}


def _run_tags(cfg: ExperimentConfig, spec, device) -> dict[str, str]:
    import platform

    import torch

    # The run's name says what differs (a sweep point, a counter); the experiment's name stays here.
    tags = {"embedft.experiment": cfg.tracking.experiment or cfg.name, "embedft.family": spec.family, "embedft.model": cfg.model.name, "embedft.pooling": spec.pooling,
            "embedft.device": str(device), "embedft.torch": torch.__version__, "embedft.python": platform.python_version()}
    try:
        import peft
        import sentence_transformers
        import transformers

        tags.update({"embedft.transformers": transformers.__version__, "embedft.peft": peft.__version__,
                     "embedft.sentence_transformers": sentence_transformers.__version__})
    except ImportError:
        pass
    if device.type == "cuda":
        tags["embedft.gpu"] = torch.cuda.get_device_name(device)
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip() or None
    except Exception:  # not a git checkout: the commit is simply unknown
        return None


def _make_plots(out: Path, result, base_eval, adapted_eval) -> list[Path]:
    """Loss curve, recall@k base vs adapted, confusion matrix (when those exist)."""
    from embedft import plots

    out.mkdir(parents=True, exist_ok=True)
    made = []
    if result.history:
        made.append(plots.plot_loss_curve([h["step"] for h in result.history], [h["train/loss"] for h in result.history],
                                          out / "loss.png",
                                          val_epochs=[v["step"] for v in result.val_history] or None,
                                          val_recall=[v.get("val/recall@10") for v in result.val_history] or None))
    if "retrieval" in adapted_eval.details:
        base_curve = base_eval.details["retrieval"]["recall_curve"] if base_eval else {}
        made.append(plots.plot_recall_curve(sorted(adapted_eval.details["retrieval"]["recall_curve"]), base_curve,
                                            adapted_eval.details["retrieval"]["recall_curve"], out / "recall_at_k.png"))
    if "classification" in adapted_eval.details:
        d = adapted_eval.details["classification"]
        made.append(plots.plot_confusion_matrix(d["report"]["confusion_matrix"], d["class_names"],
                                                out / "confusion_matrix.png", "adapted kNN confusion matrix"))
    return made


def _report_dir(output_dir: Path, adapter_dir: Path | None, run_id: str | None) -> Path:
    # Without --out: the run folder's eval/ is its own adapter's report; any other model's report
    # (the base alone, an MLflow run's adapter, another folder's) goes beside it, never over it.
    if adapter_dir is None:
        return output_dir / "eval-base"
    if run_id:
        return output_dir / f"eval-run-{run_id[:8]}"
    if adapter_dir.resolve() != (output_dir / "adapter").resolve():
        return output_dir / f"eval-{adapter_dir.resolve().parent.name}"
    return output_dir / "eval"


def run_eval(cfg: ExperimentConfig, adapter: str | None = None, run_id: str | None = None, out: str | None = None,
             compare_base: bool = True, base_only: bool = False, save_index: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate base vs adapted on the experiment's eval split; report to disk and MLflow."""
    import tempfile

    from embedft.evaluate import (check_indexes, check_report_dir, check_tasks, compare, evaluate_encoder,
                                  format_table, write_report)
    from embedft.models import ModelError, load_encoder
    from embedft.lora import check_adapter_base, load_adapter, read_adapter_meta
    from embedft.models import resolve_device

    _check_extras(cfg)
    if save_index:
        _check_save_index(Path(save_index))
    if out:
        check_report_dir(Path(out))
    train_ex, eval_ex, _ = load_splits(cfg.data)
    check_tasks(cfg.eval, train_ex, eval_ex)
    adapter_dir: Path | None = None
    tmp_download = None
    if not base_only:
        if run_id:
            from embedft import runs, tracking

            tmp_download = tempfile.mkdtemp(prefix="embedft-adapter-")
            adapter_dir = runs.download_adapter(tracking.resolve_uri(cfg.tracking), run_id, tmp_download)
        else:
            adapter_dir = Path(adapter) if adapter else cfg.output_dir / "adapter"
            if not adapter_dir.exists():
                raise ModelError(f"no adapter at {adapter_dir}; train first (embedft train {cfg.name}.yaml), pass "
                                 "--adapter DIR or --run RUN_ID, or use --base-only")
        read_adapter_meta(adapter_dir)  # clear error for incomplete folders before loading a model
    device = resolve_device(cfg.train.device)
    tracker = open_tracker(cfg.tracking, cfg.tracking.experiment or cfg.name, cfg.output_dir)
    encoder = load_encoder(cfg.model, device)
    if adapter_dir is not None:  # a --model the adapter was not trained on is refused before the base evaluation
        check_adapter_base(encoder, adapter_dir)
    check_indexes(cfg.eval, encoder.spec.hidden_size, train_ex, eval_ex)
    base_eval = evaluate_encoder(encoder, train_ex, eval_ex, cfg.eval, device, progress) \
        if (compare_base or base_only) else None
    adapted_eval = None
    if not base_only:
        load_adapter(encoder, adapter_dir)
        adapted_eval = evaluate_encoder(encoder, train_ex, eval_ex, cfg.eval, device, progress)
    report_dir = write_report(Path(out) if out else _report_dir(cfg.output_dir, adapter_dir, run_id), base_eval,
                              adapted_eval,
                              {"name": cfg.name, "model": cfg.model.name,
                               # a --run adapter's download folder is deleted below: name the run's artifact
                               "adapter": f"runs:/{run_id}/adapter" if run_id else str(adapter_dir),
                               "eval_data": eval_ex.source, "source_run_id": run_id})
    if save_index:
        _save_retrieval_index(encoder, eval_ex, cfg, save_index, str(adapter_dir) if adapter_dir else None)
    metrics = mlflow_ui.final_metrics(adapted_eval.metrics if adapted_eval else None,
                                      base_eval.metrics if base_eval else None)
    tags = _run_tags(cfg, encoder.spec, device)
    tags["embedft.command"] = "eval"
    if run_id:
        tags["embedft.source_run_id"] = run_id
    tracker.start_run(run_name=f"eval-{cfg.name}", params=flatten(to_dict(cfg)), tags=tags)
    try:
        with ending(tracker):
            tracker.log_text(to_yaml(cfg), "config.yaml")
            tracker.log_input(name=f"{cfg.name}-eval", digest=eval_ex.digest(), n_rows=len(eval_ex),
                              source=eval_ex.source, context="evaluation")
            tracker.log_metrics(metrics, step=0)
            tracker.log_artifacts(str(report_dir), "eval")
    finally:
        if tmp_download:
            shutil.rmtree(tmp_download, ignore_errors=True)
    return {"report": str(report_dir), "metrics": metrics,
            "table": format_table(compare(base_eval.metrics if base_eval else None,
                                          adapted_eval.metrics if adapted_eval else None))}


def _check_save_index(out: Path) -> None:
    # save_index never replaces a folder; refused now rather than after the whole evaluation.
    from embedft.evaluate import EvalError

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EvalError(f"--save-index {out} already exists; pass a new folder (eval does not replace an index)")


def _save_retrieval_index(encoder, eval_ex: Examples, cfg: ExperimentConfig, out_dir: str, adapter: str | None) -> Path:
    """The adapted model's index over the eval corpus, with a manifest the search team can check."""
    from embedft.index import build_index, save_index

    corpus = retrieval_task(eval_ex).corpus
    vectors = encoder.encode(corpus, batch_size=cfg.eval.batch_size)
    factory = cfg.eval.indexes[0] if cfg.eval.indexes else "Flat"
    index = build_index(vectors, factory)
    manifest = {"model": encoder.spec.fingerprint if adapter is None else f"{encoder.spec.fingerprint}+{Path(adapter).name}",
                "base_model": cfg.model.name, "adapter": adapter, "dim": int(vectors.shape[1]),
                "metric": "inner_product", "normalized": encoder.spec.normalize, "factory": factory,
                "count": len(corpus), "pooling": encoder.spec.pooling, "query_template": encoder.spec.query_template}
    return save_index(out_dir, index, corpus, manifest, overwrite=False)


def parse_sweeps(sweeps: tuple[str, ...] | list[str]) -> list[list[str]]:
    """['lora.r=8,16', 'train.lr=1e-4,3e-4'] -> the grid as lists of overrides."""
    import itertools

    from embedft.config import ConfigError

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
    tracker = open_tracker(cfg.tracking, cfg.name, cfg.output_dir)
    parent = tracker.start_run(run_name=f"{cfg.name}-sweep", params={"sweep": " x ".join(sweeps)},
                               tags={"embedft.sweep": "parent"})
    out = []
    with ending(tracker):
        for child in points:
            s = run_train(child, progress=progress, parent_run_id=parent)
            out.append({"name": child.name, **s})
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
