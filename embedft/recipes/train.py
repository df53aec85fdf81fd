"""The train recipe: config -> data -> model + LoRA -> loop -> evaluation (base vs adapted) -> tracking."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from embedft import distributed
from embedft.atomic import building, holding, replace_dir, write_text
from embedft.config import ExperimentConfig, flatten, resolve_epochs, to_dict, to_yaml
from embedft.errors import ConfigError
from embedft.recipes.common import ending, open_tracker, prepare_data, setup_processes
from embedft.tracking.base import NullTracker
from embedft.tracking import ui as mlflow_ui
from embedft.training.validation import val_set_for

log = logging.getLogger(__name__)

OUT_FIX = "free space there or set -o train.output_dir to another disk"
OUT_ELSEWHERE = "set -o train.output_dir to another folder"
# A run folder another training holds (the same experiment name twice at once):
OUT_IN_USE = "give this run its own folder: -o name=NEW_NAME or -o train.output_dir=DIR"
RUN_ID_FILE = ".mlflow-run-id"  # in the run folder: the MLflow run a --resume continues from


def run_train(cfg: ExperimentConfig, resume: bool = False, progress: bool = True,
              parent_run_id: str | None = None) -> dict[str, Any]:
    """Train one experiment end to end; returns the run summary (paths and metrics).

    Under torchrun every rank runs this: each trains its share of every global batch and embeds
    its share of every evaluation; rank 0 alone writes the run folder and the MLflow run, and holds
    the folder while it does: a second training on it meanwhile is refused (`atomic.holding`)."""
    from embedft.training.checkpoint import require_checkpoint

    cfg = _resolve_epochs(cfg)
    data = prepare_data(cfg)
    out = cfg.output_dir
    if resume:  # nothing to resume: refused before the run folder is made or a model loaded
        require_checkpoint(out / "checkpoint")
    device, dist = setup_processes(cfg.train.device)
    progress = progress and dist.is_main
    # An unreachable store is refused before the folder is made.
    tracker = open_tracker(cfg.tracking, cfg.name, out) if dist.is_main else NullTracker()
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file where a folder should be, no permission, read-only disk
            raise ConfigError(f"train.output_dir: cannot make the run folder {out} ({e.strerror}: {e.filename}); "
                              "set -o train.output_dir to a folder you can write") from None
    with holding(out, "embedft train", OUT_IN_USE) if dist.is_main else contextlib.nullcontext():
        return _train_and_evaluate(cfg, data, device, dist, tracker, resume, progress, parent_run_id)


def _resolve_epochs(cfg: ExperimentConfig) -> ExperimentConfig:
    """train.epochs=auto as the number it means for this data's shape, so MLflow's params, the run's config.yaml
    and the adapter's metadata record what ran."""
    if cfg.train.epochs != "auto":
        return cfg
    epochs = resolve_epochs(cfg.train.epochs, cfg.data.shape)
    log.info("train.epochs=auto: %d epochs for %s data", epochs, cfg.data.shape)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs))


def _train_and_evaluate(cfg: ExperimentConfig, data, device, dist, tracker, resume: bool, progress: bool,
                        parent_run_id: str | None) -> dict[str, Any]:
    import torch

    from embedft.evaluation.report import compare, format_table, quantization_meta, write_report
    from embedft.evaluation.tasks import check_indexes, dropped_tasks, evaluate_encoder
    from embedft.modeling.builders import load_quantized, make_trainable
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.lora import load_adapter, lora_settings, save_adapter
    from embedft.modeling.runtime import base_dtype, seed_everything
    from embedft.training.checkpoint import check_resumable, run_identity
    from embedft.training.loop import train

    out = cfg.output_dir
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    encoder = load_encoder(cfg.model, device, cfg.lora)
    log.info("model %s: family=%s pooling=%s on %s", cfg.model.name, encoder.spec.family, encoder.spec.pooling, device)
    check_indexes(cfg.eval, encoder.spec.hidden_size, data.train, data.eval)
    if resume:  # refused now, not after the base model's evaluation
        check_resumable(out / "checkpoint", run_identity(encoder.spec, lora_settings(encoder, cfg.lora), data.source,
                                                         cfg.train, cfg.loss, dist.world_size))

    base_eval = evaluate_encoder(encoder, data.train, data.eval, cfg.eval, device, progress) \
        if cfg.eval.compare_base else None
    quantization = cfg.train.quantization
    if quantization:  # QLoRA: the same base, quantised by bitsandbytes, is what trains; nothing else reads it
        spec, encoder = encoder.spec, None  # the unquantised base leaves the device before the quantised one loads
        encoder = load_quantized(cfg.model, device, cfg.lora, quantization, spec)
        log.info("frozen base quantised to %s by bitsandbytes (train.base_quantization); evaluated and exported "
                 "unquantised", quantization)
    seed_everything(cfg.train.seed)  # LoRA init does not depend on whether the base was evaluated
    dtype = base_dtype(cfg.train.base_dtype, device)
    if dtype != torch.float32 and not quantization:
        log.info("frozen base weights in %s (train.base_dtype=%s)", dtype, cfg.train.base_dtype)
    make_trainable(encoder, cfg.lora, dtype)
    # Validation (model selection, early stopping) reads the split carved out of the training data,
    # never data.eval: that is read by the evaluations alone.
    val = val_set_for(encoder, data.fit, data.val, cfg)

    tags = _run_tags(cfg, encoder.spec, device)
    previous = (out / RUN_ID_FILE).read_text().strip() if resume and (out / RUN_ID_FILE).is_file() else None
    if previous:
        tags["embedft.resumed_from"] = previous
    run_id = tracker.start_run(run_name=cfg.tracking.run_name or cfg.name,
                               params={**flatten(to_dict(cfg)), "world_size": dist.world_size},
                               tags=tags, parent_run_id=parent_run_id)
    if previous:
        tracker.end_stale_run(previous)  # a run killed without warning (SIGKILL) stays RUNNING otherwise
    if run_id:  # rank 0's alone: the other ranks' tracker is a NullTracker
        write_text(out / RUN_ID_FILE, run_id, OUT_FIX)
    with ending(tracker):
        tracker.log_text(to_yaml(cfg), "config.yaml")
        for role, ex in (("train", data.train), ("eval", data.eval)):
            tracker.log_input(name=f"{cfg.name}-{role}", digest=ex.digest(), n_rows=len(ex), source=ex.source,
                              context="training" if role == "train" else "evaluation")
        tracker.log_metrics({f"data/{k}": float(v) for k, v in data.report.counts.items()}, step=0)

        result = train(encoder, data.source, cfg.train, cfg.loss, out, val=val, sink=tracker, resume=resume,
                       progress=progress)

        adapter_dir = out / "adapter"
        if dist.is_main:  # an earlier adapter stays whole if this fails; the checkpoint has this one
            with building(adapter_dir, OUT_ELSEWHERE, "the checkpoint is kept: run again with --resume") as tmp:
                save_adapter(encoder, tmp, {"experiment": cfg.name, "config": to_dict(cfg),
                                            "data": {"train_digest": data.train.digest(),
                                                     "eval_digest": data.eval.digest(),
                                                     "train_rows": len(data.train), "eval_rows": len(data.eval)},
                                            "mlflow_run_id": run_id, "world_size": dist.world_size})
                replace_dir(tmp, adapter_dir)
            write_text(out / "config.yaml", to_yaml(cfg), OUT_FIX)
        distributed.barrier()  # the adapter is on disk before any rank reads it back

        if dtype != torch.float32 or quantization:
            # Report what `embedft eval` and the export load: the saved adapter on the fp32, unquantised base.
            encoder = None  # the training model leaves the device first
            encoder = load_adapter(load_encoder(cfg.model, device, cfg.lora), adapter_dir)
        adapted_eval = evaluate_encoder(encoder, data.train, data.eval, cfg.eval, device, progress)
        if not dist.is_main:  # the other ranks embedded their shares; rank 0 reports
            return {"rank": dist.rank, "adapter": str(adapter_dir), "output_dir": str(out)}
        report_dir = write_report(out / "eval", base_eval, adapted_eval,
                                  {"name": cfg.name, "model": cfg.model.name, "adapter": str(adapter_dir),
                                   "eval_data": data.eval.source, "train_steps": result.steps,
                                   "dropped_tasks": dropped_tasks(cfg.eval, data.train, data.eval),
                                   **quantization_meta(quantization)})
        final = mlflow_ui.final_metrics(adapted_eval.metrics, base_eval.metrics if base_eval else None)
        final.update({"train/total_seconds": result.train_seconds, "train/avg_samples_per_s": result.samples_per_s,
                      "train/avg_tokens_per_s": result.tokens_per_s})
        if result.best_epoch is not None:
            # Every validation metric of the kept epoch (train/best_val/...), the selected one among them: each epoch
            # selection saw is in val_history.
            best = next(v for v in result.val_history if v["epoch"] == result.best_epoch)
            final.update({"train/best_epoch": float(result.best_epoch), "train/epochs_done": float(result.epochs_done),
                          "train/still_improving": float(result.still_improving),
                          **{f"train/best_{k}": v for k, v in best.items() if k.startswith("val/")}})
        tracker.log_metrics(final, step=0)  # one value per run: at step 0 the MLflow UI draws it as a bar, not a line
        plots = _make_plots(out / "plots", result, base_eval, adapted_eval)
        tracker.log_artifacts(str(adapter_dir), "adapter")
        tracker.log_artifacts(str(report_dir), "eval")
        for p in plots:
            tracker.log_artifact(str(p), "plots")
        summary = {"run_id": run_id, **tracker.links(), "output_dir": str(out), "adapter": str(adapter_dir),
                   "report": str(report_dir),
                   "steps": result.steps, "train_seconds": result.train_seconds, "epochs_done": result.epochs_done,
                   "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
                   "still_improving": result.still_improving, "suggested_epochs": result.suggested_epochs,
                   "samples_per_s": result.samples_per_s, "metrics": final,
                   "table": format_table(compare(base_eval.metrics if base_eval else None, adapted_eval.metrics))}
        write_text(out / "summary.json", json.dumps({k: v for k, v in summary.items() if k != "table"}, indent=2),
                   OUT_FIX)
        return summary


def _run_tags(cfg: ExperimentConfig, spec, device) -> dict[str, str]:
    import platform

    import torch

    # The run's name says what differs (a sweep point, a counter); the experiment's name stays here.
    tags = {"embedft.experiment": cfg.tracking.experiment or cfg.name, "embedft.family": spec.family,
            "embedft.model": cfg.model.name, "embedft.pooling": spec.pooling,
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
    from embedft.evaluation import plots

    out.mkdir(parents=True, exist_ok=True)
    made = []
    if result.history:
        metric = next(iter(result.best_metric), None) or \
            ("val/macro_f1" if any("val/macro_f1" in v for v in result.val_history) else "val/recall@10")
        made.append(plots.plot_loss_curve([h["step"] for h in result.history], [h["train/loss"] for h in result.history],
                                          out / "loss.png",
                                          val_epochs=[v["step"] for v in result.val_history] or None,
                                          val_recall=[v.get(metric) for v in result.val_history] or None,
                                          val_name=metric.replace("/", " ").replace("_", "-")))
    if "retrieval" in adapted_eval.details:
        base_curve = base_eval.details["retrieval"]["recall_curve"] if base_eval else {}
        made.append(plots.plot_recall_curve(sorted(adapted_eval.details["retrieval"]["recall_curve"]), base_curve,
                                            adapted_eval.details["retrieval"]["recall_curve"], out / "recall_at_k.png"))
    if "classification" in adapted_eval.details:
        d = adapted_eval.details["classification"]
        made.append(plots.plot_confusion_matrix(d["report"]["confusion_matrix"], d["class_names"],
                                                out / "confusion_matrix.png", "adapted kNN confusion matrix"))
    return made
