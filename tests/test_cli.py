"""CLI: bad input gives exit code 2 and one clear line (file, row, option named), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from embedft.cli import main

REPO = Path(__file__).resolve().parents[1]
ROWS = [(f"item {g} variant {j}", str(g), f"cat{g % 3}") for g in range(12) for j in range(3)]



def write_csv(path: Path, rows, header="text,group,label") -> Path:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


@pytest.fixture
def experiment(tmp_path) -> Path:
    """An experiment YAML over a small grouped CSV, writing its run folder under tmp_path."""
    write_csv(tmp_path / "data.csv", ROWS)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"name: clitest\ndata:\n  train: {tmp_path / 'data.csv'}\n  shape: grouped\n  eval_fraction: 0.25\n"
                   f"train:\n  batch_size: 4\n  output_dir: {tmp_path / 'run'}\ntracking:\n  enabled: false\n")
    return cfg


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_clean_error(result, *needles: str) -> str:
    """Exit code 2, the message on one `error:` line holding every needle, no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_help_lists_the_commands_without_importing_torch():
    result = invoke("--help")
    assert result.exit_code == 0
    for cmd in ("train", "eval", "check"):
        assert f"  {cmd} " in result.output
    code = "import sys, embedft.cli; print(sorted({'torch', 'faiss', 'mlflow', 'pandas'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_check_default_experiment_prints_rows(monkeypatch):
    monkeypatch.chdir(REPO)  # its data path is relative to the repo root
    result = invoke("check", "experiments/default.yaml")
    assert result.exit_code == 0, result.output
    assert "name: default" in result.output
    counts = {ln.split(":")[0].strip(): ln.split(":")[1].strip() for ln in result.stdout.splitlines()
              if ln.startswith(("training anchors: ", "  train_rows: ", "  eval_rows: "))}
    train_rows, eval_rows, anchors = int(counts["train_rows"]), int(counts["eval_rows"]), int(counts["training anchors"])
    assert train_rows > 0 and eval_rows > 0 and 0 < anchors <= train_rows


def test_check_our_experiment(experiment):
    result = invoke("check", str(experiment), "-o", "data.split=modulo", "-o", "data.split_modulo=4")
    assert result.exit_code == 0, result.output
    # groups 0, 4, 8 (3 texts each) are eval; the other 9 groups are train, one of them carved out
    # as the validation split (train.val_fraction: at least one group).
    assert "training anchors: 24" in result.stdout and "val_rows: 3" in result.stdout
    # 6 batches of 4 an epoch, 5 epochs: what train.epochs=auto means for grouped data
    assert "training steps: 30 (5 epochs, train.epochs=auto for grouped data; batches of 4)" in result.stdout
    result = invoke("check", str(experiment), "-o", "data.split=modulo", "-o", "data.split_modulo=4",
                    "-o", "train.epochs=2")
    assert "training steps: 12 (2 epochs; batches of 4)" in result.stdout
    assert "  train_rows: 27" in result.stdout and "  eval_rows: 9" in result.stdout


def test_missing_config_file(tmp_path):
    assert_clean_error(invoke("check", str(tmp_path / "nope.yaml")), "nope.yaml", "config file not found")


def test_train_empty_file(experiment, tmp_path):
    (tmp_path / "empty.csv").write_text("")
    result = invoke("train", str(experiment), "-o", f"data.train={tmp_path / 'empty.csv'}", "-o",
                    "tracking.enabled=false")
    assert_clean_error(result, "empty.csv", "the file is empty")


def test_train_missing_column(experiment):
    result = invoke("train", str(experiment), "-o", "data.text_column=title", "-o", "tracking.enabled=false")
    assert_clean_error(result, "data.csv", "missing column 'title'", "data.text_column", "columns are: text, group, label")


def test_train_nan_text(experiment, tmp_path):
    rows = [list(r) for r in ROWS]
    rows[4][0] = "NaN"  # group 1: file row 6 (header is row 1)
    write_csv(tmp_path / "data.csv", rows)
    result = invoke("train", str(experiment), "-o", "tracking.enabled=false")
    assert_clean_error(result, "data.csv", "1 empty or missing texts/groups at rows 6", "data.on_empty_text=drop")


def test_train_negative_lr(experiment):
    result = invoke("train", str(experiment), "-o", "train.lr=-1", "-o", "tracking.enabled=false")
    assert_clean_error(result, "exp.yaml", "train.lr", "must be > 0")


def test_train_unknown_key(experiment):
    result = invoke("train", str(experiment), "-o", "train.learning_rate=1e-4")
    assert_clean_error(result, "train.learning_rate: unknown key", "did you mean 'lr'")


def test_train_batch_larger_than_data(experiment):
    result = invoke("train", str(experiment), "-o", "train.batch_size=500", "-o", "tracking.enabled=false")
    assert_clean_error(result, "data.csv", "train.batch_size=500", "training anchors")
    assert not (experiment.parent / "run").exists()  # rejected before the run folder is made


def test_warmup_longer_than_the_run_is_caught_by_check(experiment):
    # 27 train rows (groups 0, 4, 8 held out), one group of 3 carved out for validation -> 24 anchors
    # -> 6 batches of 4 in each of the 5 epochs (train.epochs=auto on grouped data).
    for cmd in ("check", "train"):
        result = invoke(cmd, str(experiment), "-o", "data.split=modulo", "-o", "data.split_modulo=4",
                        "-o", "train.warmup_steps=1000")
        assert_clean_error(result, "train.warmup_steps=1000 is longer than the 30 training steps (5 epochs x 6 "
                                   "batches of 4", "data.csv")
    assert not (experiment.parent / "run").exists()


def test_base_only_eval_reports_the_base_model_beside_the_run_report(experiment, tiny_bert_dir):
    import json

    result = invoke("eval", str(experiment), "--base-only", "-o", f"model.name={tiny_bert_dir}")
    assert result.exit_code == 0, result.output
    report = json.loads((experiment.parent / "run" / "eval-base" / "report.json").read_text())
    assert report["adapted"] is None and report["base"]["retrieval/recall@10"] > 0
    assert not (experiment.parent / "run" / "eval").exists()  # a training run's own report stays untouched


def test_eval_of_another_adapter_reports_beside_the_run_report(experiment, tiny_bert_dir, tiny_bert_adapter):
    import json

    result = invoke("eval", str(experiment), "--adapter", str(tiny_bert_adapter), "--no-base",
                    "-o", f"model.name={tiny_bert_dir}")
    assert result.exit_code == 0, result.output
    report = experiment.parent / "run" / f"eval-{tiny_bert_adapter.resolve().parent.name}" / "report.json"
    assert json.loads(report.read_text())["adapted"]["retrieval/recall@10"] > 0
    assert not (experiment.parent / "run" / "eval").exists()  # the run's own adapter's report slot stays free

    from embedft.recipes.eval import _report_dir

    run = experiment.parent / "run"
    assert _report_dir(run, run / "adapter", None) == run / "eval"
    assert _report_dir(run, None, None) == run / "eval-base"
    assert _report_dir(run, Path("/tmp/dl/adapter"), "0123456789abcdef") == run / "eval-run-01234567"


def test_eval_compare_base_false_skips_the_base_model_as_no_base(experiment, tiny_bert_dir, tiny_bert_adapter):
    import json

    out = experiment.parent / "rep"
    result = invoke("eval", str(experiment), "--adapter", str(tiny_bert_adapter), "--out", str(out),
                    "-o", f"model.name={tiny_bert_dir}", "-o", "eval.compare_base=false")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["base"] is None and report["adapted"]["retrieval/recall@10"] > 0
    # --base-only still evaluates the base model: it is the only one asked for.
    result = invoke("eval", str(experiment), "--base-only", "--out", str(out), "-o", f"model.name={tiny_bert_dir}",
                    "-o", "eval.compare_base=false")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["adapted"] is None and report["base"]["retrieval/recall@10"] > 0


def test_eval_output_dir_is_where_eval_writes_without_out(experiment, tiny_bert_dir, monkeypatch):
    import json

    import embedft.modeling.encoder as E

    model = ("-o", f"model.name={tiny_bert_dir}")
    where = experiment.parent / "reports" / "{name}"
    result = invoke("eval", str(experiment), "--base-only", *model, "-o", f"eval.output_dir={where}")
    assert result.exit_code == 0, result.output
    report = experiment.parent / "reports" / "clitest" / "report.json"  # {name} is the experiment's name
    assert json.loads(report.read_text())["base"]["retrieval/recall@10"] > 0
    assert str(report.parent) in result.output
    assert not (experiment.parent / "run" / "eval-base").exists()
    # --out still wins over eval.output_dir.
    out = experiment.parent / "explicit"
    result = invoke("eval", str(experiment), "--base-only", *model, "-o", f"eval.output_dir={where}", "--out", str(out))
    assert result.exit_code == 0 and (out / "report.json").is_file(), result.output
    # A folder that holds more than a report is refused before any model loads, naming the option.
    busy = experiment.parent / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    monkeypatch.setattr(E, "load_encoder", None)
    assert_clean_error(invoke("eval", str(experiment), "--base-only", *model, "-o", f"eval.output_dir={busy}"),
                       f"eval.output_dir {busy} holds files that are not an embedft report (notes.txt)")
    assert_clean_error(invoke("eval", str(experiment), "--base-only", "-o", "eval.output_dir=reports/{nme}"),
                       "eval.output_dir", "the only placeholder is {name}")


def test_resume_mismatch_is_refused_before_any_work(experiment, tiny_bert_dir, monkeypatch):
    import embedft.evaluation.tasks as E

    model = ("-o", f"model.name={tiny_bert_dir}", "-o", "train.max_steps=2", "-o", "eval.indexes=[]")
    assert_clean_error(invoke("train", str(experiment), *model, "--resume"), "--resume: no checkpoint in")
    assert not (experiment.parent / "run").exists()  # refused before the run folder was made
    assert invoke("train", str(experiment), *model).exit_code == 0
    monkeypatch.setattr(E, "evaluate_encoder", None)  # the base evaluation would fail: the refusal comes first
    result = invoke("train", str(experiment), *model, "-o", "lora.r=8", "--resume")
    assert_clean_error(result, "the checkpoint in", "lora.r: 16 there, 8 now", "same config and -o options")


def test_train_output_dir_that_cannot_be_made(experiment, tmp_path):
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        result = invoke("train", str(experiment), "-o", f"train.output_dir={out}")
        assert_clean_error(result, f"train.output_dir: cannot make the run folder {out}", "a folder you can write")


def test_train_into_a_run_folder_another_training_holds_is_refused(experiment, tiny_bert_dir, tmp_path, monkeypatch):
    """Two trainings of one experiment name at once wrote checkpoints and adapters into one folder."""
    import embedft.evaluation.tasks as E
    from embedft.atomic import LOCK_FILE, holding

    model = ("-o", f"model.name={tiny_bert_dir}", "-o", "train.max_steps=1", "-o", "eval.compare_base=false")
    run = tmp_path / "run"
    run.mkdir()
    with holding(run, "embedft train", "-"), monkeypatch.context() as m:
        m.setattr(E, "evaluate_encoder", None)  # the refusal comes before any model work
        result = invoke("train", str(experiment), *model)
        assert_clean_error(result, f"{run} is in use by another embedft train: process {os.getpid()} on ",
                           "Wait for it to end, or give this run its own folder: -o name=NEW_NAME or -o "
                           "train.output_dir=DIR")
        assert not (run / "adapter").exists()
    # A training killed without cleanup (SIGKILL) leaves its lock file: the next one takes it and removes it.
    (run / LOCK_FILE).write_text("12345 elsewhere embedft train")
    assert invoke("train", str(experiment), *model).exit_code == 0
    assert (run / "adapter").is_dir() and not (run / LOCK_FILE).exists()


def test_eval_into_a_run_folder_a_training_holds_is_refused_and_holds_it_itself(experiment, tiny_bert_dir, tmp_path,
                                                                                monkeypatch):
    """An eval of the old adapter, ending after a training of the same experiment, replaced the training's report."""
    import embedft.recipes.eval as R
    from embedft.atomic import LOCK_FILE, holding

    model = ("-o", f"model.name={tiny_bert_dir}", "-o", "eval.compare_base=false", "-o", "tracking.enabled=false")
    run = tmp_path / "run"
    assert invoke("train", str(experiment), *model, "-o", "train.max_steps=1").exit_code == 0
    report = (run / "eval" / "report.json").read_text()
    with holding(run, "embedft train", "-"):
        result = invoke("eval", str(experiment), *model)
        assert_clean_error(result, f"{run} is in use by embedft train: process {os.getpid()} on ",
                           "Wait for it to end, or write this report elsewhere with --out DIR")
        assert (run / "eval" / "report.json").read_text() == report
        assert invoke("eval", str(experiment), *model, "--out", str(tmp_path / "elsewhere")).exit_code == 0
        assert (tmp_path / "elsewhere" / "report.json").is_file()

    seen = []
    real = R._evaluate_and_report

    def train_meanwhile(*args, **kwargs):  # a training of the experiment started while the eval runs
        seen.append((run / LOCK_FILE).read_text())
        seen.append(invoke("train", str(experiment), *model, "-o", "train.max_steps=1"))
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "_evaluate_and_report", train_meanwhile)
    assert invoke("eval", str(experiment), *model).exit_code == 0
    assert seen[0].startswith(f"{os.getpid()} ") and seen[0].endswith(" embedft eval")
    assert_clean_error(seen[1], f"{run} is in use by embedft eval: process {os.getpid()} on ",
                       "give this run its own folder")
    assert not (run / LOCK_FILE).exists()


def test_train_loss_that_becomes_nan_is_one_line(experiment, tiny_bert_dir, monkeypatch):
    import embedft.training.losses as T

    real = T.batch_loss
    monkeypatch.setattr(T, "batch_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    result = invoke("train", str(experiment), "-o", f"model.name={tiny_bert_dir}", "-o", "train.max_steps=2",
                    "-o", "eval.compare_base=false")
    # With the progress bar on: the bar is closed first, so the error is a line of its own.
    assert_clean_error(result, "loss became nan at step 1; lower train.lr")


def test_train_model_path_that_does_not_exist(experiment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("train", str(experiment), "-o", "model.name=./nope", "-o", "tracking.enabled=false")
    assert_clean_error(result, "model.name='./nope'", "no such folder")


@pytest.fixture(scope="module")
def opt_model_dir(tmp_path_factory) -> Path:
    """A tiny random OPT model: a model_type embedft has no family for."""
    import torch
    from transformers import OPTConfig, OPTModel

    from embedft.modeling.families import MODEL_TYPES
    from embedft_testing.synthetic import build_bert_tokenizer

    out = tmp_path_factory.mktemp("tiny-opt")
    tok = build_bert_tokenizer(out)
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                    max_position_embeddings=64, word_embed_proj_dim=16)
    assert cfg.model_type not in MODEL_TYPES
    OPTModel(cfg).save_pretrained(out)
    return out


def test_train_unknown_model_family(experiment, opt_model_dir):
    result = invoke("train", str(experiment), "-o", f"model.name={opt_model_dir}", "-o", "tracking.enabled=false")
    line = assert_clean_error(result, "unrecognised architecture 'opt'", "lora.target_modules", "model.family")
    linear = line.split("Its linear layers are: ", 1)[1].split(".", 1)[0]
    assert linear == "fc1, fc2, k_proj, out_proj, q_proj, v_proj"


def test_train_unreachable_tracking_server_fails_before_training(experiment, monkeypatch, tmp_path):
    import socket

    import embedft.modeling.encoder

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(embedft.modeling.encoder, "load_encoder", lambda *a, **k: pytest.fail("model loaded before the check"))
    run = tmp_path / "runs" / "x"
    result = invoke("train", str(experiment), "-o", "tracking.enabled=true", "-o", f"tracking.uri=http://127.0.0.1:{port}",
                    "-o", f"train.output_dir={run}")
    assert_clean_error(result, f"127.0.0.1:{port}", "not reachable", "tracking.enabled=false")
    assert not run.parent.exists()  # refused before the run folder is made


def test_eval_index_faiss_cannot_build_is_refused_before_any_encoding(experiment, tiny_bert_dir, monkeypatch):
    from embedft.modeling.encoder import Encoder

    monkeypatch.setattr(Encoder, "encode", lambda *a, **k: pytest.fail("encoded before the --index check"))
    model = ("-o", f"model.name={tiny_bert_dir}")
    assert_clean_error(invoke("eval", str(experiment), *model, "--base-only", "--index", "hnsw32"),
                       "eval.indexes (--index) 'hnsw32'", "cannot parse", "did you mean 'HNSW32'?")
    # 9 eval texts (groups 3 of 12 held out) cannot train 64 IVF lists
    assert_clean_error(invoke("eval", str(experiment), *model, "--base-only", "--index", "IVF64,Flat"),
                       "eval.indexes (--index) 'IVF64,Flat'", "needs at least 64 training vectors")
    assert_clean_error(invoke("train", str(experiment), *model, "-o", "eval.compare_base=false",
                              "-o", "eval.indexes=[PQ7]"), "eval.indexes (--index) 'PQ7'")
    assert not (experiment.parent / "run" / "adapter").exists()


def test_eval_save_index_over_an_existing_folder_is_refused_before_any_work(experiment, tmp_path, monkeypatch,
                                                                           tiny_bert_dir):
    import embedft.modeling.encoder

    fresh = invoke("eval", str(experiment), "--base-only", "-o", f"model.name={tiny_bert_dir}",
                   "--save-index", str(tmp_path / "new"))
    assert fresh.exit_code == 0 and (tmp_path / "new" / "index.faiss").is_file(), fresh.output
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "index.faiss").write_text("an earlier index")
    monkeypatch.setattr(embedft.modeling.encoder, "load_encoder", lambda *a, **k: pytest.fail("model loaded before the check"))
    assert_clean_error(invoke("eval", str(experiment), "--base-only", "--save-index", str(tmp_path / "idx")),
                       f"--save-index {tmp_path / 'idx'} already exists; pass a new folder")
    assert (tmp_path / "idx" / "index.faiss").read_text() == "an earlier index"


@pytest.mark.parametrize("args, message", [
    (("--adapter", "a", "--run", "0123"), "pass --adapter DIR or --run RUN_ID, not both"),
    (("--base-only", "--adapter", "a"), "--base-only evaluates the base model alone: drop --adapter"),
    (("--base-only", "--run", "0123"), "--base-only evaluates the base model alone: drop --run"),
    (("--base-only", "--no-base"), "--base-only evaluates the base model alone: drop --no-base"),
])
def test_eval_options_that_contradict_are_refused_not_ignored(experiment, monkeypatch, args, message):
    import embedft.recipes.eval
    import embedft.recipes.sweep
    import embedft.recipes.train

    monkeypatch.setattr(embedft.recipes.eval, "run_eval", lambda *a, **k: pytest.fail("evaluated with an option ignored"))
    result = invoke("eval", str(experiment), *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_eval_index_without_a_retrieval_task_is_reported_not_silently_ignored(experiment, tiny_bert_dir, tmp_path,
                                                                               caplog):
    result = invoke("eval", str(experiment), "--base-only", "-o", f"model.name={tiny_bert_dir}", "--out",
                    str(tmp_path / "eval"), "-o", "eval.tasks=[classification]", "-o", "data.label_column=label",
                    "--index", "HNSW32")
    assert result.exit_code == 0, result.output
    assert "eval.indexes (--index) ['HNSW32'] not built: ANN indexes are reported for retrieval, which this " \
           "evaluation does not run" in caplog.text
    assert "hnsw" not in (tmp_path / "eval" / "report.md").read_text().lower()


def test_eval_out_over_a_file_or_a_folder_of_other_files_is_refused_before_any_work(experiment, tmp_path, monkeypatch):
    import embedft.modeling.encoder

    monkeypatch.setattr(embedft.modeling.encoder, "load_encoder", lambda *a, **k: pytest.fail("model loaded before the check"))
    (tmp_path / "notes.txt").write_text("keep me")
    assert_clean_error(invoke("eval", str(experiment), "--base-only", "--out", str(tmp_path / "notes.txt")),
                       f"--out {tmp_path / 'notes.txt'} is a file")
    # Writing the report would have replaced tmp_path, with the data, the config and these notes in it.
    assert_clean_error(invoke("eval", str(experiment), "--base-only", "--out", str(tmp_path)),
                       f"--out {tmp_path} holds files that are not an embedft report (data.csv, exp.yaml, notes.txt)")
    assert (tmp_path / "notes.txt").read_text() == "keep me" and (tmp_path / "data.csv").is_file()


def test_train_refuses_an_evaluation_it_cannot_run_before_training(experiment, tiny_bert_dir):
    # Without the base evaluation first, these used to fail only after training, the run folder half written.
    model = ("-o", f"model.name={tiny_bert_dir}", "-o", "eval.compare_base=false")
    assert_clean_error(invoke("train", str(experiment), *model, "-o", "eval.knn_k=1000"),
                       "eval.knn_k=1000 is larger than the 24 training texts")
    assert_clean_error(invoke("train", str(experiment), *model, "-o", "eval.tasks=[classification]",
                              "-o", "data.label_column=null"), "none of eval.tasks=['classification'] fits grouped data")
    assert_clean_error(invoke("check", str(experiment), "-o", "eval.knn_k=1000"), "eval.knn_k=1000")
    assert not (experiment.parent / "run").exists()


def test_train_resume_with_a_sweep_is_refused_not_ignored(experiment, monkeypatch):
    import embedft.recipes.eval
    import embedft.recipes.sweep
    import embedft.recipes.train

    # Ignored, the sweep would train every point afresh over the checkpoints --resume was meant to continue.
    monkeypatch.setattr(embedft.recipes.sweep, "run_sweep", lambda *a, **k: pytest.fail("swept with --resume ignored"))
    result = invoke("train", str(experiment), "--resume", "--sweep", "lora.r=4,8")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "--resume continues one run, not a --sweep" in result.output and "-o name=<name>-r8 -o lora.r=8" in result.output


def test_sweep_whose_points_share_one_run_folder_is_refused_before_training(experiment, monkeypatch):
    import embedft.recipes.eval
    import embedft.recipes.sweep
    import embedft.recipes.train

    monkeypatch.setattr(embedft.recipes.train, "run_train", lambda *a, **k: pytest.fail("trained a point"))
    # The fixture's train.output_dir has no {name}: the second point would have replaced the first one's adapter.
    result = invoke("train", str(experiment), "--sweep", "lora.r=4,8")
    assert_clean_error(result, "gives every --sweep point the same run folder", "put {name} in it")


def test_eval_with_a_model_the_adapter_was_not_trained_on_is_refused_before_the_base_evaluation(
        experiment, tiny_bert_adapter, tiny_qwen3_dir, monkeypatch):
    import embedft.evaluation.tasks as E

    monkeypatch.setattr(E, "evaluate_encoder", lambda *a, **k: pytest.fail("evaluated before the adapter check"))
    result = invoke("eval", str(experiment), "--adapter", str(tiny_bert_adapter), "-o", f"model.name={tiny_qwen3_dir}")
    assert_clean_error(result, f"adapter {tiny_bert_adapter} was trained on base model", "pass the adapter's base model")


def test_every_eval_train_and_runs_option_reaches_the_code(experiment, tmp_path, monkeypatch):
    import embedft.recipes.eval
    import embedft.recipes.sweep
    import embedft.recipes.train
    import embedft.tracking.mlflow
    import embedft.tracking.runs

    seen = {}

    def record(name, result):
        def fn(*a, **k):
            seen[name] = (a, k)
            return result
        return fn

    other = write_csv(tmp_path / "other.csv", ROWS)
    monkeypatch.setattr(embedft.recipes.eval, "run_eval", record("eval", {"table": "", "report": "r"}))
    result = invoke("eval", str(experiment), "--model", "other-model", "--data", str(other),
                    "--index", "HNSW32", "--index", "IVF4,Flat", "--linear-probe", "--adapter", "ad", "--no-base",
                    "--save-index", "idx", "--out", "rep")
    assert result.exit_code == 0, result.output
    (cfg,), k = seen["eval"]
    assert cfg.model.name == "other-model" and str(cfg.data.train) == str(other)
    assert list(cfg.eval.indexes) == ["HNSW32", "IVF4,Flat"] and cfg.eval.linear_probe is True
    assert {n: k[n] for n in ("adapter", "run_id", "out", "compare_base", "base_only", "save_index")} == \
        {"adapter": "ad", "run_id": None, "out": "rep", "compare_base": False, "base_only": False, "save_index": "idx"}

    monkeypatch.setattr(embedft.recipes.train, "run_train", record("train", {"table": "", "adapter": "a", "report": "r"}))
    assert invoke("train", str(experiment), "--resume", "--no-progress", "-o", "lora.r=4").exit_code == 0
    (cfg,), k = seen["train"]
    assert cfg.lora.r == 4 and k == {"resume": True, "progress": False}
    assert "note:" not in invoke("train", str(experiment)).output
    monkeypatch.setattr(embedft.recipes.train, "run_train", record("train", {
        "table": "", "adapter": "a", "report": "r", "still_improving": True, "epochs_done": 3, "suggested_epochs": 5}))
    assert "note: the last epoch (3) was the best on validation; more epochs may pay (-o train.epochs=5)" in \
        invoke("train", str(experiment)).output
    monkeypatch.setattr(embedft.recipes.sweep, "run_sweep", record("sweep", []))
    assert invoke("train", str(experiment), "-o", "lora.r=4", "--sweep", "train.lr=1e-4,2e-4").exit_code == 0
    (_, path, overrides, sweeps), k = seen["sweep"]
    assert (path, overrides, sweeps, k) == (str(experiment), ("lora.r=4",), ("train.lr=1e-4,2e-4",), {"progress": True})

    monkeypatch.setattr(embedft.tracking.runs, "list_runs", record("list", []))
    assert invoke("runs", "list", str(experiment), "--experiment", "other", "--sort", "params.lora.r",
                  "-n", "3").exit_code == 0
    (_, exp), k = seen["list"]
    assert exp == "other" and k == {"sort_by": "params.lora.r", "max_results": 3}
    monkeypatch.setattr(embedft.tracking.mlflow, "sync_pending", record("sync", 0))
    assert invoke("runs", "sync", "somewhere", "--uri", "http://mlflow:5000").exit_code == 0
    assert seen["sync"] == (("somewhere",), {"uri": "http://mlflow:5000"})


def test_every_export_option_reaches_the_export(tmp_path, monkeypatch):
    import embedft.export.merge

    seen = []

    def export_merged(*a, **k):
        seen.append((a, k))
        return {"out_dir": str(tmp_path / "o"), "parity": {"min_cosine": 1.0, "max_abs_diff": 0.0, "n_probes": 3}}

    monkeypatch.setattr(embedft.export.merge, "export_merged", export_merged)
    result = invoke("export", "--adapter", "ad", "--out", str(tmp_path / "o"), "--model", "base-model", "--dtype",
                    "bf16", "--overwrite", "--onnx")
    assert result.exit_code == 0, result.output
    assert seen == [(("ad", str(tmp_path / "o")), {"model_name": "base-model", "dtype": "bf16", "overwrite": True,
                                                    "onnx": True, "source": None})]


# -- settings that can be checked without a model are refused before one loads (issue 35) ---------


@pytest.mark.parametrize("command", ["check", "train"])
@pytest.mark.parametrize("override, needles", [
    ("train.seed=-1", ("train.seed", "must be in [0, 2**32)")),
    ("data.split_seed=-3", ("data.split_seed", "must be >= 0")),
    ("tracking.uri=ftp://x", ("tracking.uri", "cannot track to a ftp:// store", "tracking.enabled=false")),
    ("eval.indexes=[HNSW3x2]", ("eval.indexes (--index) 'HNSW3x2'", "could not parse index string HNSW3x2",
                                "HNSW32")),
    ("model.name=nobody/no-such-model-0.6B", ("model.name='nobody/no-such-model-0.6B'", "not in the Hugging Face cache",
                                            "HF_HUB_OFFLINE")),
])
def test_a_setting_that_cannot_work_is_refused_before_any_model_loads(command, override, needles, experiment,
                                                                     monkeypatch):
    import embedft.modeling.encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(embedft.modeling.encoder, "load_encoder", lambda *a, **k: pytest.fail("model loaded first"))
    result = invoke(command, str(experiment), "-o", override, "-o", "tracking.enabled=false")
    assert_clean_error(result, *needles)
    assert not (experiment.parent / "run").exists()  # no run folder left behind


def test_a_bad_tracking_uri_from_the_environment_is_refused_before_training(experiment, monkeypatch):
    import embedft.modeling.encoder

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "ftp://x")
    monkeypatch.setattr(embedft.modeling.encoder, "load_encoder", lambda *a, **k: pytest.fail("model loaded first"))
    result = invoke("train", str(experiment), "-o", "tracking.enabled=true")
    assert_clean_error(result, "tracking store 'ftp://x'", "cannot track to a ftp:// store")


def test_a_hub_id_whose_name_has_a_dot_is_a_hub_id(monkeypatch):
    from embedft.modeling.families import resolve_model_path

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve_model_path("Qwen/Qwen3-Embedding-0.6B") == "Qwen/Qwen3-Embedding-0.6B"
