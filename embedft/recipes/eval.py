"""The eval recipe: base vs a trained adapter on an experiment's eval split; report to disk and MLflow."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

from embedft.atomic import holding
from embedft.config import ExperimentConfig, flatten, to_dict, to_yaml
from embedft.data.examples import Examples, load_splits, retrieval_task
from embedft.evaluation.tasks import check_tasks
from embedft.recipes.common import _check_extras, ending, open_tracker, setup_processes
from embedft.recipes.train import _run_tags
from embedft.tracking import ui as mlflow_ui
from embedft.tracking.base import NullTracker

log = logging.getLogger(__name__)

EVAL_IN_USE = "write this report elsewhere with --out DIR"


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
    """Evaluate base vs adapted on the experiment's eval split; report to disk and MLflow.

    The base model is evaluated when `compare_base` and eval.compare_base both say so (or `base_only`);
    the report goes to `out`, else eval.output_dir, else a folder in the run folder (`_report_dir`).
    Under torchrun every rank embeds its share of each text set; rank 0 alone reports and tracks."""
    import tempfile

    from embedft.errors import ModelError
    from embedft.evaluation.report import check_report_dir
    from embedft.modeling.lora import read_adapter_meta

    _check_extras(cfg)
    if save_index:
        _check_save_index(Path(save_index))
    if out:
        check_report_dir(Path(out))
    elif cfg.eval_output_dir is not None:
        check_report_dir(cfg.eval_output_dir, "eval.output_dir")
    compare_base = compare_base and cfg.eval.compare_base
    train_ex, eval_ex, _ = load_splits(cfg.data)
    check_tasks(cfg.eval, train_ex, eval_ex)
    adapter_dir: Path | None = None
    adapter_meta: dict = {}
    tmp_download = None
    try:
        if not base_only:
            if run_id:
                from embedft.tracking import mlflow as tracking
                from embedft.tracking import runs

                tmp_download = tempfile.mkdtemp(prefix="embedft-adapter-")
                adapter_dir = runs.download_adapter(tracking.resolve_uri(cfg.tracking), run_id, tmp_download)
            else:
                adapter_dir = Path(adapter) if adapter else cfg.output_dir / "adapter"
                if not adapter_dir.exists():
                    raise ModelError(f"no adapter at {adapter_dir}; train first (embedft train {cfg.name}.yaml), pass "
                                     "--adapter DIR or --run RUN_ID, or use --base-only")
            adapter_meta = read_adapter_meta(adapter_dir)  # clear error for incomplete folders before loading a model
        device, dist = setup_processes(cfg.train.device)
        progress = progress and dist.is_main
        report_at = Path(out) if out else cfg.eval_output_dir or _report_dir(cfg.output_dir, adapter_dir, run_id)
        # A report into the run folder holds it, as `embedft train` does: a training of that experiment meanwhile
        # writes its own report there, which this one, of the adapter read before it ended, must not replace.
        held = dist.is_main and cfg.output_dir.is_dir() and \
            report_at.resolve().is_relative_to(cfg.output_dir.resolve())
        with holding(cfg.output_dir, "embedft eval", EVAL_IN_USE) if held else contextlib.nullcontext():
            return _evaluate_and_report(cfg, train_ex, eval_ex, adapter_dir, adapter_meta, run_id, report_at,
                                        compare_base, base_only, save_index, device, dist, progress)
    finally:
        if tmp_download:
            shutil.rmtree(tmp_download, ignore_errors=True)


def _evaluate_and_report(cfg: ExperimentConfig, train_ex: Examples, eval_ex: Examples, adapter_dir: Path | None,
                         adapter_meta: dict, run_id: str | None, report_at: Path, compare_base: bool,
                         base_only: bool, save_index: str | None, device, dist, progress: bool) -> dict[str, Any]:
    from embedft.evaluation.report import compare, format_table, quantization_meta, write_report
    from embedft.evaluation.tasks import check_indexes, dropped_tasks, evaluate_encoder
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.lora import check_adapter_base, load_adapter
    from embedft.modeling.quantization import trained_quantization

    tracker = open_tracker(cfg.tracking, cfg.tracking.experiment or cfg.name, cfg.output_dir) if dist.is_main \
        else NullTracker()
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
    if not dist.is_main:  # this rank embedded its shares; rank 0 reports
        if save_index:
            _save_retrieval_index(encoder, eval_ex, cfg, save_index, str(adapter_dir) if adapter_dir else None)
        return {"rank": dist.rank}
    report_dir = write_report(report_at, base_eval, adapted_eval,
                              {"name": cfg.name, "model": cfg.model.name,
                               "dropped_tasks": dropped_tasks(cfg.eval, train_ex, eval_ex),
                               # a --run adapter's download folder is deleted below: name the run's artifact
                               "adapter": f"runs:/{run_id}/adapter" if run_id else str(adapter_dir),
                               "eval_data": eval_ex.source, "source_run_id": run_id,
                               **quantization_meta(trained_quantization(adapter_meta))})
    if save_index:
        _save_retrieval_index(encoder, eval_ex, cfg, save_index, str(adapter_dir) if adapter_dir else None)
    metrics = mlflow_ui.final_metrics(adapted_eval.metrics if adapted_eval else None,
                                      base_eval.metrics if base_eval else None)
    tags = _run_tags(cfg, encoder.spec, device)
    tags["embedft.command"] = "eval"
    if run_id:
        tags["embedft.source_run_id"] = run_id
    tracker.start_run(run_name=f"eval-{cfg.name}", params=flatten(to_dict(cfg)), tags=tags)
    with ending(tracker):
        tracker.log_text(to_yaml(cfg), "config.yaml")
        tracker.log_input(name=f"{cfg.name}-eval", digest=eval_ex.digest(), n_rows=len(eval_ex),
                          source=eval_ex.source, context="evaluation")
        tracker.log_metrics(metrics, step=0)
        tracker.log_artifacts(str(report_dir), "eval")
    return {"report": str(report_dir), "metrics": metrics,
            "table": format_table(compare(base_eval.metrics if base_eval else None,
                                          adapted_eval.metrics if adapted_eval else None))}


def _check_save_index(out: Path) -> None:
    # save_index never replaces a folder; refused now rather than after the whole evaluation.
    from embedft.errors import EvalError

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EvalError(f"--save-index {out} already exists; pass a new folder (eval does not replace an index)")


def _save_retrieval_index(encoder, eval_ex: Examples, cfg: ExperimentConfig, out_dir: str, adapter: str | None) -> Path:
    """The adapted model's index over the eval corpus, with a manifest the search team can check."""
    from embedft.evaluation.index import build_index, index_manifest, save_index

    from embedft import distributed

    corpus = retrieval_task(eval_ex).corpus
    vectors = encoder.encode(corpus, batch_size=cfg.eval.batch_size)  # under torchrun: every rank embeds its share
    if not distributed.current().is_main:
        return Path(out_dir)
    factory = cfg.eval.indexes[0] if cfg.eval.indexes else "Flat"
    index = build_index(vectors, factory)
    model = encoder.spec.fingerprint if adapter is None else f"{encoder.spec.fingerprint}+{Path(adapter).name}"
    manifest = index_manifest(model, index, factory, encoder.spec.normalize, base_model=cfg.model.name,
                              adapter=adapter, pooling=encoder.spec.pooling, query_template=encoder.spec.query_template)
    return save_index(out_dir, index, corpus, manifest, overwrite=False)
