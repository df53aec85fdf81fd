"""embedft command line. Each command parses, loads the config and calls one function.

Heavy imports (torch, faiss, mlflow) happen inside the commands, so `embedft --help`
answers at once.
"""

from __future__ import annotations

import logging
import signal
import sys

import click

OVERRIDE_HELP = "Override a config value, e.g. -o train.lr=1e-4 (repeatable)."
NO_PROGRESS_HELP = "No progress bars (for logs)."


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "sentence_transformers", "transformers", "alembic", "mlflow", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _progress(no_progress: bool) -> bool:
    # --no-progress is for logs: it also silences transformers' and the hub's bars (loading weights, downloads).
    if no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return not no_progress


def _load(config: str | None, overrides: tuple[str, ...]):
    from embedft.config import load_config

    return load_config(config, overrides)


class _Group(click.Group):
    """Turns the package's own input errors into one clear line and exit code 2."""

    def invoke(self, ctx):
        from embedft.errors import EmbedftError

        # FloatingPointError: the training loop's "loss became nan", whose message names train.lr.
        known = (EmbedftError, FileNotFoundError, FloatingPointError)
        try:
            result = super().invoke(ctx)
        except known as e:
            click.echo(f"error{_rank_label()}: {e}", err=True)
            _leave_process_group(sync=False)
            sys.exit(2)
        except BaseException:
            _leave_process_group(sync=False)
            raise
        _leave_process_group(sync=True)
        return result


def _leave_process_group(sync: bool) -> None:
    """Under torchrun, leave the process group as the command ends: after a barrier when it ended well on this
    rank (`distributed.teardown`). Nothing to do where torch was never imported."""
    if "torch.distributed" in sys.modules:
        from embedft import distributed

        distributed.teardown(sync=sync)


def _is_main() -> bool:
    """Whether this process prints a command's results: always, but under torchrun rank 0 alone."""
    from embedft.distributed import current

    return current().is_main


def _rank_label() -> str:
    """' (rank R of N)' under torchrun, so a failure names the process it happened in."""
    from embedft.distributed import from_env

    try:
        d = from_env()
    except RuntimeError:
        return ""
    return f" (rank {d.rank} of {d.world_size})" if d.enabled else ""


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
@click.option("--resume", is_flag=True, help="Continue from the run folder's last checkpoint (each epoch's end, and every train.checkpoint_every steps).")
@click.option("--sweep", "sweeps", multiple=True,
              help="Grid over a key, e.g. --sweep lora.r=8,16,32 (repeatable); each point is a child run.")
@click.option("--no-progress", is_flag=True, help=NO_PROGRESS_HELP)
def train(config: str, overrides: tuple[str, ...], resume: bool, sweeps: tuple[str, ...], no_progress: bool) -> None:
    """Fine-tune LoRA adapters on CONFIG (an experiment YAML) and evaluate base vs adapted."""
    from embedft.recipes.sweep import run_sweep
    from embedft.recipes.train import run_train

    if resume and sweeps:  # a sweep trains every point afresh: its children's checkpoints would be overwritten
        raise click.UsageError("--resume continues one run, not a --sweep (which trains every point afresh): resume "
                               "a killed point alone with its name and value, e.g. --resume -o name=<name>-r8 -o lora.r=8")
    cfg = _load(config, overrides)
    progress = _progress(no_progress)
    # `kill`, `docker stop` and job schedulers send SIGTERM: end the MLflow run as KILLED (the
    # last checkpoint stays for --resume) instead of dying with the run left RUNNING.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if sweeps:
            children = run_sweep(cfg, config, overrides, sweeps, progress=progress)
            if not _is_main():  # under torchrun, rank 0 alone prints
                return
            for s in children:
                click.echo(f"{s['name']}: {s['output_dir']}")
            _echo_ui_link(children[-1] if children else {})
            return
        summary = run_train(cfg, resume=resume, progress=progress)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not _is_main():  # under torchrun, rank 0 alone prints the run's table
        return
    click.echo(summary["table"])
    if summary.get("still_improving"):
        click.echo(f"\nnote: the last epoch ({summary['epochs_done']}) was the best on validation; more epochs may "
                   f"pay (-o train.epochs={summary['suggested_epochs']})")
    click.echo(f"\nadapter: {summary['adapter']}\nreport:  {summary['report']}/report.md")
    if summary.get("run_id"):
        click.echo(f"mlflow run: {summary.get('run_name')} ({summary['run_id']})")
    _echo_ui_link(summary)


def _echo_ui_link(summary: dict) -> None:
    # The link opens the runs as model training, with the key figures as columns (docs/mlflow-ui.md).
    if summary.get("experiment_url"):
        from embedft.tracking.ui import UI_ADDRESS

        after = " (after `make ui`)" if summary["experiment_url"].startswith(UI_ADDRESS) else ""
        click.echo(f"mlflow ui:  {summary['experiment_url']}{after}")


def _exit_on_sigterm(signum, frame) -> None:
    click.echo("embedft train: stopped by SIGTERM; its MLflow run (if tracked) ends as KILLED, and the same command with --resume "
               "continues from the last checkpoint", err=True)
    raise SystemExit(128 + signum)


@main.command("eval")
@click.argument("config", required=False, type=click.Path())
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
@click.option("--model", help="Base model (hub id, folder or alias); default: the config's model.name.")
@click.option("--adapter", type=click.Path(), help="Adapter folder; default: the experiment's runs/<name>/adapter.")
@click.option("--run", "run_id", help="MLflow run id whose adapter to evaluate.")
@click.option("--data", help="Data file; default: the config's data.train (split as configured).")
@click.option("--index", "indexes", multiple=True, help="FAISS factory string next to exact search, e.g. HNSW32.")
@click.option("--save-index", type=click.Path(), help="Write the adapted model's retrieval index here.")
@click.option("--out", type=click.Path(), help="Report folder; default: eval.output_dir if set, else <run folder>/eval for the run's own adapter, else beside it: "
              "eval-base (--base-only), eval-run-<id> (--run), eval-<adapter's folder> (--adapter). An earlier report there "
              "is replaced; a folder holding anything else is refused.")
@click.option("--no-base", is_flag=True, help="Skip the base model (no side-by-side); as eval.compare_base=false.")
@click.option("--base-only", is_flag=True, help="Evaluate only the base model (no adapter).")
@click.option("--linear-probe", is_flag=True, help="Also a logistic-regression probe (MTEB-style classification).")
def eval_cmd(config, overrides, model, adapter, run_id, data, indexes, save_index, out, no_base, base_only,
             linear_probe) -> None:
    """Evaluate base vs adapted with FAISS: retrieval recall/MRR/nDCG and kNN classification."""
    from embedft.recipes.eval import run_eval

    if adapter and run_id:
        raise click.UsageError("pass --adapter DIR or --run RUN_ID, not both")
    if base_only and (adapter or run_id or no_base):
        raise click.UsageError("--base-only evaluates the base model alone: drop "
                               + ("--no-base" if no_base else "--adapter" if adapter else "--run"))
    extra = list(overrides)
    if model:
        extra.append(f"model.name={model}")
    if data:
        extra.append(f"data.train={data}")
    if indexes:
        extra.append("eval.indexes=[" + ", ".join(f'"{i}"' for i in indexes) + "]")
    if linear_probe:
        extra.append("eval.linear_probe=true")
    cfg = _load(config, tuple(extra))
    summary = run_eval(cfg, adapter=adapter, run_id=run_id, out=out, compare_base=not no_base,
                       base_only=base_only, save_index=save_index)
    if not _is_main():  # under torchrun, rank 0 alone prints the table
        return
    click.echo(summary["table"])
    click.echo(f"\nreport: {summary['report']}/report.md")


@main.command()
@click.argument("config", type=click.Path())
@click.option("-o", "--override", "overrides", multiple=True, help=OVERRIDE_HELP)
def check(config: str, overrides: tuple[str, ...]) -> None:
    """Validate CONFIG and its data without loading a model; print the resolved config."""
    from embedft.config import resolve_epochs, to_yaml
    from embedft.data.batches import check_schedule
    from embedft.recipes.common import prepare_data

    cfg = _load(config, overrides)
    data = prepare_data(cfg)
    click.echo(to_yaml(cfg))
    click.echo(f"training anchors: {data.source.n_anchors}")
    steps, epochs = check_schedule(data.source, cfg.train), resolve_epochs(cfg.train.epochs, cfg.data.shape)
    auto = f", train.epochs=auto for {cfg.data.shape} data" if cfg.train.epochs == "auto" else ""
    click.echo(f"training steps: {steps} ({epochs} epochs{auto}; batches of {cfg.train.batch_size})")
    for k, v in sorted(data.report.counts.items()):
        click.echo(f"  {k}: {v}")


@main.command("export")
@click.option("--adapter", type=click.Path(), help="Adapter folder (runs/<name>/adapter).")
@click.option("--run", "run_id", help="MLflow run id whose adapter to export (instead of --adapter).")
@click.option("--out", required=True, type=click.Path(), help="Folder for the merged sentence-transformers model.")
@click.option("--model", help="Base model (hub id, folder or alias); default: the one the adapter was trained on.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Weights dtype of the export (parity is checked against a looser tolerance for bf16/fp16).")
@click.option("--overwrite", is_flag=True, help="Replace an existing export folder.")
@click.option("--onnx", is_flag=True, help="Also write onnx/model.onnx (the whole embedding as one graph), parity-checked with onnxruntime; needs onnx and onnxruntime.")
@click.option("--register", "register_name", metavar="NAME",
              help="Then register the export in the MLflow model registry as NAME (a new version), linked to "
                   "the adapter's training run when the store has it.")
def export_cmd(adapter, run_id, out, model, dtype, overwrite, onnx, register_name) -> None:
    """Merge a LoRA adapter into its base and save a plain sentence-transformers model, parity-checked."""
    import tempfile

    from embedft.export.merge import export_merged

    if bool(adapter) == bool(run_id):
        raise click.UsageError("pass exactly one of --adapter DIR or --run RUN_ID")
    with tempfile.TemporaryDirectory(prefix="embedft-adapter-") as tmp:
        if run_id:
            from embedft.config import TrackingConfig
            from embedft.tracking import mlflow as tracking
            from embedft.tracking import runs

            adapter = runs.download_adapter(tracking.resolve_uri(TrackingConfig()), run_id, tmp)
        report = export_merged(adapter, out, model_name=model, dtype=dtype, overwrite=overwrite, onnx=onnx,
                               source=f"runs:/{run_id}/adapter" if run_id else None)
    p = report["parity"]
    click.echo(f"exported {report['out_dir']} ({dtype}): min cosine {p['min_cosine']:.7f}, "
               f"max abs diff {p['max_abs_diff']:.3g} over {p['n_probes']} probes")
    if "onnx" in report:
        o = report["onnx"]
        click.echo(f"onnx/model.onnx (onnxruntime): min cosine {o['min_cosine']:.7f}, max abs diff {o['max_abs_diff']:.3g}")
    if register_name:
        import json
        from pathlib import Path

        from embedft.config import TrackingConfig
        from embedft.export.parity import EXPORT_META
        from embedft.tracking import mlflow as tracking
        from embedft.tracking import runs

        saved = json.loads((Path(report["out_dir"]) / EXPORT_META).read_text())
        source_run = ((saved.get("adapter") or {}).get("meta") or {}).get("mlflow_run_id") or run_id
        reg = runs.register_model(tracking.resolve_uri(TrackingConfig()), report["out_dir"], register_name,
                                  run_id=source_run)
        click.echo(f"registered {reg['name']} version {reg['version']}")


@main.command()
@click.argument("model_dir", type=click.Path())
@click.option("--min-cosine", type=click.FloatRange(0, 1, min_open=True), help="Override the export's saved tolerance.")
@click.option("--max-abs-diff", type=click.FloatRange(min=0), help="Override the export's saved tolerance.")
@click.option("--server", metavar="URL", help="Instead, check a running `embedft serve` (e.g. http://127.0.0.1:8080): "
              "the probes embedded by --served-model must match the export's reference vectors.")
@click.option("--served-model", metavar="NAME", help="With --server: the served model (adapter) the export was made from.")
@click.option("--api-key", envvar="EMBEDFT_API_KEY", help="With --server: its bearer token (or set EMBEDFT_API_KEY).")
def verify(model_dir: str, min_cosine: float | None, max_abs_diff: float | None, server: str | None,
           served_model: str | None, api_key: str | None) -> None:
    """Re-embed an export's probe texts with plain sentence-transformers (or a running server, --server);
    exit 1 if they drifted."""
    from embedft.errors import ExportError
    from embedft.export.verify import verify_export

    if bool(server) != bool(served_model):
        raise click.UsageError("--server URL and --served-model NAME go together")
    try:
        if server:
            from embedft.serving.verify import verify_server

            p = verify_server(model_dir, server, served_model, api_key=api_key, min_cosine=min_cosine,
                              max_abs_diff=max_abs_diff)
            click.echo(f"OK: {server} model {served_model}: min cosine {p['min_cosine']:.7f} "
                       f"(>= {p['tolerances']['min_cosine']}), max abs diff {p['max_abs_diff']:.3g} "
                       f"(<= {p['tolerances']['max_abs_diff']:.3g}) over {p['n_probes']} probes as documents and queries")
            return
        p = verify_export(model_dir, min_cosine=min_cosine, max_abs_diff=max_abs_diff)
    except ExportError as e:
        click.echo(f"FAIL: {e}", err=True)
        sys.exit(1)
    click.echo(f"OK: min cosine {p['min_cosine']:.7f} (>= {p['tolerances']['min_cosine']}), max abs diff "
               f"{p['max_abs_diff']:.3g} (<= {p['tolerances']['max_abs_diff']:.3g}) over {p['n_probes']} probes")
    o = p.get("onnx")
    if o is not None and o.get("ok") is None:
        click.echo(f"onnx/model.onnx not checked: {o['skipped']}")
    elif o is not None:
        click.echo(f"OK: onnx/model.onnx (onnxruntime): min cosine {o['min_cosine']:.7f} "
                   f"(>= {o['tolerances']['min_cosine']}), max abs diff {o['max_abs_diff']:.3g} "
                   f"(<= {o['tolerances']['max_abs_diff']:.3g})")


@main.command("serve")
@click.option("--model", required=True, help="Base model (hub id, folder or alias, e.g. minilm); served under its own "
              "name (--base-name).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=SOURCE",
              help="Serve an adapter as NAME (repeatable). SOURCE: an adapter or run folder, runs:/RUN_ID or "
                   "models:/NAME/VERSION (MLflow store: $MLFLOW_TRACKING_URI, else ./mlflow.db).")
@click.option("--base-name", help="The name the base model is served under. Default: the --model value.")
@click.option("--host", help="Address to bind. Default: 127.0.0.1 (this machine only).")
@click.option("--port", type=click.IntRange(0, 65535), help="Default: 8080; 0 takes a free port (the log names it).")
@click.option("--api-key", envvar="EMBEDFT_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health (or set EMBEDFT_API_KEY).")
@click.option("--device", help="auto, cpu, cuda or cuda:N. Default: cpu.")
@click.option("--max-batch-tokens", type=click.IntRange(min=1), help="Padded tokens per forward pass. Default: 8192.")
@click.option("--max-wait-ms", type=click.FloatRange(0, 10000),
              help="How long the oldest queued text waits for others to share its forward pass. Default: 5.")
@click.option("--max-queue", "max_queue_rows", type=click.IntRange(min=1),
              help="Texts waiting at most; beyond, 503 with Retry-After. Default: 2048.")
@click.option("--max-inputs", type=click.IntRange(min=1), help="Texts per request at most. Default: 256.")
@click.option("--no-truncate", is_flag=True, help="Answer 413 to a text past the model's max_length instead of cutting it.")
def serve_cmd(model, adapters, base_name, host, port, api_key, device, max_batch_tokens, max_wait_ms, max_queue_rows,
              max_inputs, no_truncate) -> None:
    """Serve a base model and its LoRA adapters over an OpenAI-compatible HTTP embeddings API (docs/serving.md).

    Requests for different adapters share one forward pass; adapters can be added and removed
    while serving (POST /v1/adapters, DELETE /v1/adapters/NAME). SIGTERM finishes the requests in
    flight, then exits 0.
    """
    from embedft.serving.adapters import parse_adapter_option
    from embedft.serving.app import serve
    from embedft.serving.config import ServeConfig

    given = {"host": host, "port": port, "api_key": api_key, "device": device, "max_batch_tokens": max_batch_tokens,
             "max_wait_ms": max_wait_ms, "max_queue_rows": max_queue_rows, "max_inputs": max_inputs,
             "truncate": False if no_truncate else None}
    cfg = ServeConfig(**{k: v for k, v in given.items() if v is not None})
    serve(model, [parse_adapter_option(a) for a in adapters], cfg, base_name=base_name)


NO_HEADER_HELP = "A CSV/TSV without a header row: name columns by 0-based position (--text-column 1)."
BATCH_SIZE_HELP = ("Bounds a forward call: at most this many rows of the longest text's padded tokens "
                   "(and, on the CPU, this many rows); lower it if the device runs out of memory. Default: 128.")


DEVICE_HELP = "auto (CUDA when there is one, else the CPU), cpu, cuda or cuda:N. Default: auto."
CHUNK_ROWS_HELP = ("Stream the corpus this many rows at a time through on-disk shards beside --out, for a corpus "
                   "larger than memory; a killed build, run again, continues from its last finished shard. "
                   "0 reads the corpus whole. Default: whole up to 100,000 rows, else in chunks of 100,000.")


def _encode_kwargs(batch_size: int | None, device: str | None) -> dict:
    """--batch-size and --device when given; else the index functions' own defaults."""
    return {k: v for k, v in (("batch_size", batch_size), ("device", device)) if v is not None}


@main.group("index")
def index_group() -> None:
    """FAISS indexes built with an exported model."""


@index_group.command("build")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="An `embedft export` folder.")
@click.option("--corpus", required=True, type=click.Path(), help="CSV/TSV/JSONL/Parquet file of documents.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--id-column", default="id", show_default=True,
              help="Without the column, a row's id is its row number in the file (its line in a CSV/TSV or JSONL, "
                   "the header being line 1), the number error messages give.")
@click.option("--label-column", help="Keep each row's label, so `index search --classify` can vote.")
@click.option("--no-header", is_flag=True, help=NO_HEADER_HELP)
@click.option("--index", "factory", default="Flat", show_default=True, help="FAISS factory string, e.g. HNSW32.")
@click.option("--out", required=True, type=click.Path(), help="Index folder (index.faiss, ids.json, manifest.json).")
@click.option("--overwrite", is_flag=True, help="Replace an existing index folder.")
@click.option("--batch-size", type=click.IntRange(min=1), help=BATCH_SIZE_HELP)
@click.option("--device", help=DEVICE_HELP)
@click.option("--chunk-rows", type=click.IntRange(min=0), help=CHUNK_ROWS_HELP)
@click.option("--no-progress", is_flag=True, help=NO_PROGRESS_HELP)
def index_build(model_dir, corpus, text_column, id_column, label_column, no_header, factory, out, overwrite,
                batch_size, device, chunk_rows, no_progress) -> None:
    """Embed a corpus with an exported model and save a FAISS inner-product index.

    Under torchrun (torchrun --nproc-per-node N -m embedft index build ...) the processes share
    the corpus's shards and rank 0 saves the index.
    """
    from embedft.search.indexing import index_corpus

    m = index_corpus(model_dir, corpus, out, factory=factory, text_column=text_column, id_column=id_column,
                     header=not no_header, label_column=label_column, overwrite=overwrite,
                     progress=_progress(no_progress), chunk_rows=chunk_rows, **_encode_kwargs(batch_size, device))
    if _is_main():
        click.echo(f"index {out}: {m['count']} vectors, dim {m['dim']}, {factory}, model {m['model']}")


@index_group.command("search")
@click.argument("index_dir", type=click.Path())
@click.argument("queries", nargs=-1)
@click.option("--queries", "queries_file", type=click.Path(), help="CSV/TSV/JSONL/Parquet file of queries, one per row.")
@click.option("--text-column", default="text", show_default=True, help="The queries file's text column.")
@click.option("--id-column", default="id", show_default=True,
              help="The queries file's id column (else its row numbers, as for the corpus).")
@click.option("--no-header", is_flag=True, help=NO_HEADER_HELP)
@click.option("-k", "k", default=10, show_default=True, help="Hits per query.")
@click.option("--model", "model_dir", type=click.Path(), help="Default: the export the index was built with.")
@click.option("--show-text", is_flag=True, help="Show each hit's text, read from the corpus the index was built from.")
@click.option("--classify", is_flag=True,
              help="Label each query by its k hits' similarity-weighted vote (an index built with --label-column).")
@click.option("--ef-search", type=int, help="HNSW indexes: candidates kept per query (default: the index's); "
              "higher finds more of the true neighbours, slower.")
@click.option("--nprobe", type=int, help="IVF indexes: lists scanned per query, 1..nlist (default: the index's); "
              "nlist scans them all.")
@click.option("--out", type=click.Path(), help="Write the hits as JSON lines here instead of printing them.")
@click.option("--batch-size", type=click.IntRange(min=1), help=BATCH_SIZE_HELP)
@click.option("--device", help=DEVICE_HELP)
@click.option("--no-progress", is_flag=True, help=NO_PROGRESS_HELP)
def index_search(index_dir, queries, queries_file, text_column, id_column, no_header, k, model_dir, show_text,
                 classify, ef_search, nprobe, out, batch_size, device, no_progress) -> None:
    """Top-k documents of an `embedft index build` folder for each query (given as arguments or --queries)."""
    from embedft.search import indexing
    from embedft.search.corpus import read_corpus

    if queries and queries_file:
        raise click.UsageError("give queries as arguments or with --queries, not both")
    if out:
        indexing.check_results_path(out)  # before the search, not after it
    if queries_file:
        rows = read_corpus(queries_file, text_column, id_column, header=not no_header)
        query_ids, queries = rows.ids, rows.texts
    else:
        query_ids = [str(i) for i in range(1, len(queries) + 1)]  # numbered as the output lists them
        empty = [i for i, q in zip(query_ids, queries) if not q.strip()]
        if empty:
            raise click.BadParameter(f"query {', '.join(empty)} of {len(queries)} is empty (numbered from 1, as the "
                                     f"output lists queries); remove it", param_hint="QUERIES")
    folder = indexing.open_index(index_dir)
    # Read before the search, so a missing corpus or labels fail fast.
    texts = indexing.corpus_texts(folder) if show_text else None
    label_of = indexing.index_labels(folder) if classify else None
    hits = indexing.search_index(folder, list(queries), k=k, model_dir=model_dir, ef_search=ef_search, nprobe=nprobe,
                               progress=_progress(no_progress), **_encode_kwargs(batch_size, device))
    labels = indexing.classify(hits, label_of) if label_of is not None else None
    records = indexing.results_records(query_ids, queries, hits, texts, labels)
    if out:
        indexing.write_results(out, records)
        click.echo(f"{out}: top {k} of {len(records)} queries")
    else:
        click.echo(indexing.format_results(records))


@main.group("runs")
def runs_group() -> None:
    """List, compare and sync MLflow runs."""


@runs_group.command("list")
@click.argument("config", required=False, type=click.Path())
@click.option("--experiment", help="MLflow experiment name; default: the config's (or 'default').")
@click.option("--sort", "sort_by", default="metrics.adapted/retrieval/recall@10", show_default=True,
              help="Sort key, e.g. metrics.adapted/classification/macro_f1 or params.lora.r.")
@click.option("-n", "--max-results", default=50, show_default=True)
def runs_list(config, experiment, sort_by, max_results) -> None:
    """A table of an experiment's runs with their main params and metrics, best first."""
    from embedft.tracking import mlflow as tracking
    from embedft.tracking import runs

    cfg = _load(config, ())
    uri = tracking.resolve_uri(cfg.tracking)
    rows = runs.list_runs(uri, experiment or cfg.tracking.experiment or cfg.name, sort_by=sort_by,
                          max_results=max_results)
    click.echo(runs.format_runs_table(rows, runs.runs_columns(sort_by)) if rows else f"no runs in experiment "
               f"{experiment or cfg.tracking.experiment or cfg.name!r} at {uri}")


@runs_group.command("sync")
@click.argument("path", default="runs", type=click.Path())
@click.option("--uri", help="Tracking URI; default: the one each spool was written for.")
def runs_sync(path: str, uri: str | None) -> None:
    """Deliver records spooled while the tracking server was away (runs/<name>/.mlflow-pending)."""
    from embedft.tracking import mlflow as tracking

    n = tracking.sync_pending(path, uri=uri)
    click.echo(f"delivered {n} pending record(s) from {path}")


if __name__ == "__main__":
    main()
