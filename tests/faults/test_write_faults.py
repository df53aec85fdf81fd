"""Disk faults at every writer: a write that fails after N bytes (no space, no permission, read-only)
is one WriteError naming the path and the fix, leaves no partial file, keeps the previous artifact,
and the next command works. A train killed (SIGKILL) while checkpointing or saving its adapter resumes."""

import errno
import json
from pathlib import Path

import pytest
import torch
from faults.disk import run_killed

import embedft.atomic as atomic
from embedft.errors import WriteError

ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied",
          errno.EROFS: "the file system is read-only"}
OFFSETS = (0, 7, 4096)  # before the first byte, inside a block, after a block


@pytest.fixture
def fail_writes(monkeypatch):
    """fail_writes(after, code): every write through atomic._write puts `after` more bytes down, then fails."""

    def arm(after: int, code: int = errno.ENOSPC):
        def write(f, data):
            f.write(data[:after])
            raise OSError(code, ERRNOS[code])

        monkeypatch.setattr(atomic, "_write", write)

    yield arm


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


@pytest.mark.parametrize("code", sorted(ERRNOS))
@pytest.mark.parametrize("after", OFFSETS)
def test_write_bytes_fails_whole_and_keeps_the_old_file(tmp_path, fail_writes, after, code):
    out = tmp_path / "a" / "f.json"
    atomic.write_text(out, "old")
    fail_writes(after, code)
    with pytest.raises(WriteError) as e:
        atomic.write_bytes(out, b"x" * 10_000, "free space there")
    assert str(e.value) == f"cannot write {out}: {ERRNOS[code]}; free space there" and e.value.errno == code
    assert out.read_text() == "old" and _leftovers(tmp_path) == []


@pytest.fixture
def trainable(tiny_bert_dir):
    from embedft.config import LoraConfig, ModelConfig, TrainConfig
    from embedft.modeling.builders import build_encoder
    from embedft.training.loop import make_optimizer

    enc = build_encoder(ModelConfig(name=str(tiny_bert_dir)), "cpu", LoraConfig(r=2))
    opt = make_optimizer(enc, TrainConfig(), torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return enc, opt, sched


@pytest.mark.parametrize("code", sorted(ERRNOS))
@pytest.mark.parametrize("after", OFFSETS)
def test_a_checkpoint_that_cannot_be_written_keeps_the_last_one_loadable(tmp_path, trainable, fail_writes, after,
                                                                         code):
    from embedft.training.checkpoint import load_checkpoint, save_checkpoint
    from embedft.training.result import TrainResult

    enc, opt, sched = trainable
    ckpt = tmp_path / "run" / "checkpoint"
    save_checkpoint(ckpt, enc, opt, sched, epoch=1, step=5, result=TrainResult(5, 1))
    with torch.no_grad():
        next(p for n, p in enc.named_parameters() if "lora_B" in n).add_(1.0)  # the state the failed save had
    fail_writes(after, code)
    with pytest.raises(WriteError) as e:
        save_checkpoint(ckpt, enc, opt, sched, epoch=2, step=10, result=TrainResult(10, 2))
    msg = str(e.value)
    assert f"cannot write {ckpt.parent / 'checkpoint.tmp'}" in msg and ERRNOS[code] in msg
    assert "the last checkpoint is kept: run again with --resume" in msg
    assert _leftovers(tmp_path) == [] and not (ckpt.parent / "checkpoint.tmp").exists()
    assert load_checkpoint(ckpt, enc, opt, sched, TrainResult(0, 0)) == (1, 5, 0)
    assert all(float(p.detach().abs().max()) == 0.0 for n, p in enc.named_parameters() if "lora_B" in n)  # step 5's


@pytest.mark.parametrize("after", OFFSETS)
def test_a_report_that_cannot_be_written_keeps_the_earlier_one(tmp_path, fail_writes, after):
    from embedft.evaluation.report import write_report
    from embedft.evaluation.tasks import EvalOutput

    out = write_report(tmp_path / "eval", None, EvalOutput({"retrieval/recall@1": 0.5}, {}), {"name": "first"})
    fail_writes(after)
    with pytest.raises(WriteError) as e:  # named as in place, not as the temporary folder it was written in
        write_report(out, None, EvalOutput({"retrieval/recall@1": 0.9}, {}), {"name": "second"})
    assert str(e.value) == (f"cannot write {out / 'report.json'}: no space left on the device; free space there or "
                            "write the report elsewhere with --out; the earlier report, if any, is kept")
    assert json.loads((out / "report.json").read_text())["meta"] == {"name": "first"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


def _train_args(experiment: Path, model: Path, run: Path) -> list[str]:
    """`embedft train` of 4 steps, a checkpoint every 2, no tracking, no base evaluation."""
    return ["train", str(experiment), "-o", f"model.name={model}", "-o", f"train.output_dir={run}",
            "-o", "train.max_steps=4", "-o", "train.checkpoint_every=2", "-o", "tracking.enabled=false",
            "-o", "eval.compare_base=false", "--no-progress"]


def test_a_train_whose_checkpoint_fails_stops_on_one_line_and_resumes(tiny_bert_experiment, tiny_bert_dir, tmp_path,
                                                                      monkeypatch):
    from click.testing import CliRunner

    from embedft.cli import main
    from embedft.training import checkpoint

    run = tmp_path / "run"
    args = _train_args(tiny_bert_experiment, tiny_bert_dir, run)
    real, saves = checkpoint.write_bytes, []

    def full_after_first_checkpoint(out, data, fix=""):
        saves.append(out.name)
        if saves.count("state.pt") == 2:
            raise atomic.write_error(out, OSError(errno.ENOSPC, "No space left on device"), fix)
        real(out, data, fix)

    monkeypatch.setattr(checkpoint, "write_bytes", full_after_first_checkpoint)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "no space left on the device; free space there or set -o train.output_dir to another disk; " \
           "the last checkpoint is kept: run again with --resume" in res.output
    assert json.loads((run / "checkpoint" / "progress.json").read_text())["step"] == 2
    monkeypatch.undo()
    res = CliRunner().invoke(main, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 4 and _leftovers(run) == []


@pytest.mark.parametrize("after", OFFSETS)
def test_an_adapter_a_plot_or_an_index_that_cannot_be_written_leaves_nothing(tmp_path, trainable, fail_writes, after):
    import faiss
    import numpy as np

    from embedft.evaluation.index import save_index
    from embedft.evaluation.plots import plot_loss_curve
    from embedft.modeling.lora import save_adapter

    enc, _, _ = trainable
    fail_writes(after)
    with pytest.raises(WriteError, match=r"cannot write .*embedft_meta\.json: no space left on the device"):
        save_adapter(enc, tmp_path / "adapter")
    with pytest.raises(WriteError, match=r"cannot write .*loss\.png: no space left on the device"):
        plot_loss_curve([1, 2, 3], [1.0, 0.5, 0.2], tmp_path / "plots" / "loss.png")
    index = faiss.IndexFlatIP(4)
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(WriteError) as e:
        save_index(tmp_path / "idx", index, ["a", "b", "c", "d"], {"model": "m"})
    assert str(e.value) == (f"cannot write {tmp_path / 'idx' / 'ids.json'}: no space left on the device; free space "
                            "there or write the index elsewhere with --out; an earlier index is kept")
    assert not (tmp_path / "idx").exists() and not (tmp_path / "plots" / "loss.png").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("code", sorted(ERRNOS))
def test_adapter_weights_the_disk_refuses_are_one_error(tmp_path, trainable, disk, code):
    from embedft.modeling.lora import save_adapter

    enc, _, _ = trainable
    out = tmp_path / "adapter"
    point = disk("adapter_model.safetensors", 7, code)  # written by peft through safetensors (Rust)
    with pytest.raises(WriteError) as e:
        save_adapter(enc, out)
    fix = "free space there or write elsewhere" if code == errno.ENOSPC else "write elsewhere (a folder you can write)"
    assert point.fired and str(e.value) == f"cannot write {out}: {ERRNOS[code]}; {fix}"


def test_a_faiss_write_failure_names_the_index_file(tmp_path, monkeypatch):
    import faiss
    import numpy as np

    from embedft.evaluation.index import save_index

    def full(index, path):
        raise RuntimeError("Error in faiss::FileIOWriter: write failed")

    monkeypatch.setattr(faiss, "write_index", full)
    index = faiss.IndexFlatIP(4)
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(WriteError, match=r"cannot write .*idx/index\.faiss: faiss could not write it \(Error in "
                                         r"faiss::FileIOWriter: write failed\); check free space"):
        save_index(tmp_path / "idx", index, ["a", "b", "c", "d"], {"model": "m"})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


TRAIN = """
from embedft.cli import main
main({args!r})
"""


# A kill at a checkpoint's swap is the replace_dir kill of test_kills.py: each train process costs ~10 s.
@pytest.mark.slow  # a child process loading torch and the model
@pytest.mark.parametrize("at, after, nth, step", [("state.pt", 4096, 2, 2),  # inside the second checkpoint
                                                  ("adapter_model.safetensors", 7, 1, 4)])  # trained, saving
def test_a_train_killed_while_writing_resumes_to_the_end(tiny_bert_experiment, tiny_bert_dir, tmp_path, at, after,
                                                         nth, step):
    from click.testing import CliRunner

    from embedft.cli import main

    run = tmp_path / "run"
    args = _train_args(tiny_bert_experiment, tiny_bert_dir, run)
    run_killed(at, after, TRAIN.format(args=args), tmp_path, nth=nth)
    assert json.loads((run / "checkpoint" / "progress.json").read_text())["step"] == step  # the last one, whole
    assert not (run / "adapter").exists()
    res = CliRunner().invoke(main, args + ["--resume"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and not (run / "checkpoint.tmp").exists()
    assert not list(run.glob(".*.tmp-*"))  # what the kill left went with the next write of its artifact
