"""Training and evaluation under torchrun: 2 gloo processes on the CPU do what one process does.

The loop-level tests spawn 2 ranks from the test (`embedft_testing.ranks`); the command-level ones
run `python -m torch.distributed.run --nproc-per-node 2 -m embedft ...` as a user would. All in
fp32 with dropout off where they compare against one process (bf16 rounds differently for
differently shaped batches, and dropout draws other masks).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedft_testing.ranks import (
    SCENARIOS,
    free_port,
    killed_and_resumed,
    run_ranks,
    scenarios_in_ranks,
    train_scenario,
)

TOL = 1e-5  # the bar: per-step loss and final LoRA weights


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def two_rank_scenarios(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    return run_ranks(scenarios_in_ranks, 2, str(tiny_bert_dir), str(out))


@pytest.mark.parametrize("name", SCENARIOS)
def test_two_ranks_train_the_one_process_model(name, two_rank_scenarios, tiny_bert_dir, tmp_path):
    """Pairs with mined (and re-mined) hard negatives, group batches with the label term, and cached
    negatives: every step's loss and the final adapter equal one process's."""
    import torch

    torch.set_num_threads(1)
    one = train_scenario(str(tiny_bert_dir), name, str(tmp_path / "one"))
    rank0, rank1 = (r[name] for r in two_rank_scenarios)
    assert len(rank0["losses"]) == len(one["losses"]) == one["steps"] >= 10
    assert max(abs(a - b) for a, b in zip(one["losses"], rank0["losses"])) <= TOL
    assert _max_diff(one["adapter"], rank0["adapter"]) <= TOL
    assert _max_diff(rank0["adapter"], rank1["adapter"]) == 0.0  # the ranks never drift apart
    moved = max(float(np.abs(v).max()) for k, v in one["adapter"].items() if "lora_B" in k)
    assert moved > 100 * TOL  # LoRA B starts at zero: the comparison is of trained weights


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_adapter_with_dropout_on(tiny_bert_dir, tmp_path):
    """Each rank draws its own dropout masks; the checkpoint keeps every rank's RNG, so a resumed
    2-rank run equals the uninterrupted one exactly."""
    r0, r1 = run_ranks(killed_and_resumed, 2, str(tiny_bert_dir), "pairs_hard", str(tmp_path), 0.1)
    assert r0["killed"]["killed"] and r1["killed"]["killed"]
    progress = r0["killed"]["checkpoint"]
    assert progress["step"] == 4 and progress["batches_done"] == 4  # mid-epoch: 5 batches an epoch
    assert r0["resumed"]["steps"] == r0["full"]["steps"]
    assert _max_diff(r0["full"]["adapter"], r0["resumed"]["adapter"]) <= 1e-6
    assert _max_diff(r0["resumed"]["adapter"], r1["resumed"]["adapter"]) == 0.0


# ---------------------------------------------------------------------------------------
# The command line under torchrun.

FP32 = ["-o", "train.base_dtype=fp32", "-o", "lora.dropout=0", "-o", "train.base_dropout=false",
        "-o", "train.epochs=1", "-o", "train.log_every=1", "-o", "train.checkpoint_every=5"]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _embedft(args: list[str], ranks: int = 1, module: str = "embedft", timeout: int = 300):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
              "--master-port", str(free_port()), "-m", module] if ranks > 1 else [sys.executable, "-m", module]
    return subprocess.run(launch + args, capture_output=True, text=True, timeout=timeout, env=_env())


def _adapter(run: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(next((run / "adapter").glob("*.safetensors"))))


def _history(run: Path) -> list[float]:
    return [h["train/loss"] for h in json.loads((run / "checkpoint" / "progress.json").read_text())["history"]]


def _quality(metrics: dict) -> dict:
    """The metrics less timings (seconds, qps, build time), which differ run to run."""
    return {k: v for k, v in metrics.items() if not k.endswith(("seconds", "qps", "build_s", "_s"))}


def _same_metrics(a: dict, b: dict) -> bool:
    a, b = _quality(a), _quality(b)
    return a.keys() == b.keys() and len(a) > 10 and all(abs(a[k] - b[k]) <= 1e-6 for k in a)


def _table(stdout: str) -> str:
    return stdout.split("\nadapter:")[0]


@pytest.fixture(scope="module")
def cli_runs(tiny_bert_experiment, tmp_path_factory):
    """The default experiment on the tiny BERT, in one process and in 2 (tracked in one MLflow store)."""
    root = tmp_path_factory.mktemp("cli")
    db = f"sqlite:///{root}/mlflow.db"
    runs = {}
    for name, ranks in (("one", 1), ("two", 2)):
        p = _embedft(["train", str(tiny_bert_experiment), *FP32, "-o", f"train.output_dir={root / name}",
                      "-o", f"tracking.uri={db}", "-o", "tracking.experiment=ddp", "--no-progress"], ranks)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = (root / name, p)
    return root, db, runs


def test_torchrun_train_prints_and_writes_what_one_process_does(cli_runs):
    root, db, runs = cli_runs
    (one, p1), (two, p2) = runs["one"], runs["two"]
    assert _table(p2.stdout) == _table(p1.stdout)  # rank 0 alone prints the table
    assert p2.stdout.count("adapter:") == 1
    assert max(abs(a - b) for a, b in zip(_history(one), _history(two))) <= TOL
    assert len(_history(two)) == len(_history(one)) > 10
    assert _max_diff(_adapter(one), _adapter(two)) <= TOL
    r1, r2 = (json.loads((d / "eval" / "report.json").read_text()) for d in (one, two))
    for side in ("base", "adapted"):
        assert _same_metrics(r1[side], r2[side]), side
    assert sorted(x.name for x in two.iterdir()) == sorted(x.name for x in one.iterdir())
    assert "16 per rank on 2 rank(s)" in p2.stderr and "32 texts (groups) per step (global)" in p2.stderr


def test_torchrun_train_is_one_mlflow_run_with_its_world_size(cli_runs):
    import mlflow

    root, db, runs = cli_runs
    client = mlflow.MlflowClient(db)
    exp = client.get_experiment_by_name("ddp")
    found = client.search_runs([exp.experiment_id])
    assert len(found) == 2  # one per command, not one per rank
    sizes = sorted(r.data.params["world_size"] for r in found)
    assert sizes == ["1", "2"]
    assert all(r.info.status == "FINISHED" for r in found)


def test_torchrun_eval_equals_the_one_process_evaluation(cli_runs, tiny_bert_experiment):
    root, db, runs = cli_runs
    one = runs["one"][0]
    p = _embedft(["eval", str(tiny_bert_experiment), *FP32, "--adapter", str(one / "adapter"),
                  "--out", str(root / "eval2"), "-o", "tracking.enabled=false"], 2)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads((root / "eval2" / "report.json").read_text())
    want = json.loads((one / "eval" / "report.json").read_text())
    for side in ("base", "adapted"):
        assert _same_metrics(got[side], want[side]), side
    assert p.stdout.count("report:") == 1


def test_a_killed_rank_stops_the_run_and_resume_finishes_it_as_uninterrupted(cli_runs, tiny_bert_experiment):
    root, db, runs = cli_runs
    out = root / "killed"
    args = ["train", str(tiny_bert_experiment), *FP32, "-o", f"train.output_dir={out}", "-o",
            "tracking.enabled=false", "--no-progress"]
    p = _embedft(["1", "2", *args], 2, module="embedft_testing.kill_rank")  # rank 1 dies after its 2nd checkpoint
    assert p.returncode != 0
    assert not (out / "adapter").exists()  # nothing of the end of the run was written
    step = json.loads((out / "checkpoint" / "progress.json").read_text())["step"]
    assert step in (5, 10)  # the last checkpoint rank 0 finished writing
    p = _embedft([*args, "--resume"], 2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _max_diff(_adapter(out), _adapter(runs["two"][0])) <= 1e-6
    assert _history(out) == pytest.approx(_history(runs["two"][0]), abs=1e-6)


def test_resuming_with_another_number_of_processes_is_refused(cli_runs, tiny_bert_experiment):
    root, db, runs = cli_runs
    two = runs["two"][0]
    p = _embedft(["train", str(tiny_bert_experiment), *FP32, "-o", f"train.output_dir={two}", "-o",
                  "tracking.enabled=false", "--resume"])
    assert p.returncode == 2
    assert "written by 2 process(es), and this run has 1; resume with the same number" in p.stderr
