"""embedft command line. Each command parses, loads the config and calls one function.

Heavy imports (torch, faiss, mlflow) happen inside the commands, so `embedft --help`
answers at once.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

OVERRIDE_HELP = "Override a config value, e.g. -o train.lr=1e-4 (repeatable)."


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "sentence_transformers", "transformers", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(config: str | None, overrides: tuple[str, ...]):
    from embedft.config import load_config

    return load_config(config, overrides)


class _Group(click.Group):
    """Turns the package's own input errors into one clear line and exit code 2."""

    def invoke(self, ctx):
        from embedft.config import ConfigError

        known: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)
        try:
            from embedft.data import DataError
            from embedft.evaluate import EvalError
            from embedft.models import ModelError

            known += (DataError, ModelError, EvalError)
        except ImportError:  # an install without torch still reports config errors cleanly
            pass
        try:
            return super().invoke(ctx)
        except known as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="embedft")
def main(verbose: bool) -> None:
    """Adapt embedding models to your domain: LoRA contrastive fine-tuning, FAISS evaluation,
    MLflow tracking and merged export."""
    _setup_logging(verbose)


@main.command()
@click.argument("config", type=click.Path())
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@click.option("--resume", is_flag=True, help="Continue from the run folder's last epoch checkpoint.")
@click.option("--sweep", "sweeps", multiple=True,
              help="Grid over a key, e.g. --sweep lora.r=8,16,32 (repeatable); each point is a child run.")
@click.option("--no-progress", is_flag=True, help="No progress bars (for logs).")
def train(config: str, overrides: tuple[str, ...], resume: bool, sweeps: tuple[str, ...], no_progress: bool) -> None:
    """Fine-tune LoRA adapters on CONFIG (an experiment YAML) and evaluate base vs adapted."""
    from embedft.pipeline import run_sweep, run_train

    cfg = _load(config, overrides)
    if sweeps:
        summaries = run_sweep(cfg, config, overrides, sweeps, progress=not no_progress)
        for s in summaries:
            click.echo(f"{s['name']}: {s['output_dir']}")
        return
    summary = run_train(cfg, resume=resume, progress=not no_progress)
    click.echo(summary["table"])
    click.echo(f"\nadapter: {summary['adapter']}\nreport:  {summary['report']}/report.md")
    if summary.get("run_id"):
        click.echo(f"mlflow run: {summary['run_id']}")


@main.command("eval")
@click.argument("config", required=False, type=click.Path())
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@click.option("--model", help="Base model (hub id, folder or alias); default: the config's model.name.")
@click.option("--adapter", type=click.Path(), help="Adapter folder; default: the experiment's runs/<name>/adapter.")
@click.option("--run", "run_id", help="MLflow run id whose adapter to evaluate.")
@click.option("--data", help="Data file; default: the config's data.train (split as configured).")
@click.option("--index", "indexes", multiple=True, help="FAISS factory string next to exact search, e.g. HNSW32.")
@click.option("--save-index", type=click.Path(), help="Write the adapted model's retrieval index here.")
@click.option("--out", type=click.Path(), help="Report folder; default: <run folder>/eval.")
@click.option("--no-base", is_flag=True, help="Skip the base model (no side-by-side).")
@click.option("--base-only", is_flag=True, help="Evaluate only the base model (no adapter).")
def eval_cmd(config, overrides, model, adapter, run_id, data, indexes, save_index, out, no_base, base_only) -> None:
    """Evaluate base vs adapted with FAISS: retrieval recall/MRR/nDCG and kNN classification."""
    from embedft.pipeline import run_eval

    extra = list(overrides)
    if model:
        extra.append(f"model.name={model}")
    if data:
        extra.append(f"data.train={data}")
    if indexes:
        extra.append("eval.indexes=[" + ", ".join(f'"{i}"' for i in indexes) + "]")
    cfg = _load(config, tuple(extra))
    summary = run_eval(cfg, adapter=adapter, run_id=run_id, out=out, compare_base=not no_base,
                       base_only=base_only, save_index=save_index)
    click.echo(summary["table"])
    click.echo(f"\nreport: {summary['report']}/report.md")


@main.command()
@click.argument("config", type=click.Path())
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
def check(config: str, overrides: tuple[str, ...]) -> None:
    """Validate CONFIG and its data without loading a model; print the resolved config."""
    from embedft.config import to_yaml
    from embedft.pipeline import prepare_data

    cfg = _load(config, overrides)
    data = prepare_data(cfg)
    click.echo(to_yaml(cfg))
    click.echo(f"train rows: {len(data.train)}  eval rows: {len(data.eval)}  training anchors: {data.source.n_anchors}")
    for k, v in sorted(data.report.counts.items()):
        click.echo(f"  {k}: {v}")


if __name__ == "__main__":
    main()
