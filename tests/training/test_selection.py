"""Model selection and early stopping on the validation split carved out of the training data:
the best epoch's weights are the ones a run ends with, patience stops it, a resumed run selects
as the uninterrupted one, and the eval split is never read before the final evaluation."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_train import _adapter, _encoder, toy_examples  # tests/training is on sys.path (rootdir imports)

import embedft.training.loop as loop_mod
from embedft.config import LossConfig, TrainConfig
from embedft.data.batches import build_pair_source
from embedft.training.loop import train
from embedft.training.selection import Selection
from embedft.training.validation import ValSet

# 48 toy texts, batch 8: 6 steps an epoch.
CFG = TrainConfig(epochs=4, batch_size=8, lr=3e-3, warmup_steps=0, log_every=1, patience=None)
LOSS = LossConfig(temperature=0.1)
VAL = ValSet(query_ids=[[1]], corpus_ids=[[1]], positives=None, self_ids=None)  # validate() is scripted below


def _scripted(monkeypatch, values, start=0):
    """validate() returns values[epoch] as val/recall@10 and records the weights it was given."""
    seen = []

    def fake_validate(encoder, *a, **k):
        seen.append(_adapter(encoder))
        return {"val/recall@10": values[start + len(seen) - 1]}

    monkeypatch.setattr(loop_mod, "validate", fake_validate)
    return seen


def test_selection_by_hand():
    enc = torch.nn.Linear(2, 2)
    sel = Selection("val/macro_f1", patience=2)
    assert sel.update({"val/macro_f1": 0.5}, 1, enc) and sel.best_epoch == 1
    with torch.no_grad():
        enc.weight.add_(1.0)
    assert not sel.update({"val/macro_f1": 0.5}, 2, enc)  # a tie keeps the earlier epoch
    assert sel.bad_epochs == 1 and not sel.should_stop
    assert not sel.update({"val/macro_f1": 0.4}, 3, enc) and sel.should_stop
    assert sel.restore(enc) and torch.equal(enc.weight, sel.weights["weight"])
    # A saturated metric: the tie goes to the lower validation loss.
    tie = Selection("val/recall@10")
    tie.update({"val/recall@10": 1.0, "val/loss": 0.4}, 1, enc)
    assert tie.update({"val/recall@10": 1.0, "val/loss": 0.3}, 2, enc) and tie.best_epoch == 2
    assert not tie.update({"val/recall@10": 1.0, "val/loss": 0.35}, 3, enc) and tie.best_epoch == 2
    again = Selection("val/macro_f1", patience=2)
    again.load_state_dict(sel.state_dict())
    assert (again.best_value, again.best_epoch, again.bad_epochs, again.best_loss) == (0.5, 1, 2, float("inf"))
    assert not Selection("m", keep_weights=False).restore(enc)


def test_the_run_ends_with_the_best_epochs_weights(tiny_bert_dir, tmp_path, monkeypatch):
    seen = _scripted(monkeypatch, [0.3, 0.8, 0.5, 0.4])
    enc = _encoder(tiny_bert_dir)
    res = train(enc, build_pair_source(toy_examples()), CFG, LOSS, tmp_path, val=VAL, progress=False)
    assert res.epochs_done == 4 and res.steps == 24 and len(seen) == 4
    assert res.best_epoch == 2 and res.best_metric == {"val/recall@10": 0.8} and not res.stopped_early
    assert not res.still_improving and res.suggested_epochs is None  # the best epoch was not the last
    final = _adapter(enc)
    assert all(torch.equal(final[k], seen[1][k]) for k in final)  # epoch 2's weights, not epoch 4's
    assert any(not torch.equal(final[k], seen[3][k]) for k in final)
    # select_best=false keeps the last epoch's weights (and still records the best epoch).
    seen = _scripted(monkeypatch, [0.3, 0.8, 0.5, 0.4])
    enc = _encoder(tiny_bert_dir)
    res = train(enc, build_pair_source(toy_examples()), replace(CFG, select_best=False), LOSS, tmp_path / "last",
                val=VAL, progress=False)
    assert res.best_epoch == 2 and all(torch.equal(_adapter(enc)[k], seen[3][k]) for k in seen[3])


def test_a_run_whose_last_epoch_is_best_says_more_epochs_may_pay(tiny_bert_dir, tmp_path, monkeypatch, caplog):
    _scripted(monkeypatch, [0.3, 0.5, 0.6, 0.8])
    with caplog.at_level("WARNING", logger="embedft.training.loop"):
        res = train(_encoder(tiny_bert_dir), build_pair_source(toy_examples()), CFG, LOSS, tmp_path, val=VAL,
                    progress=False)
    assert res.best_epoch == 4 and res.still_improving and res.suggested_epochs == 6
    assert "the last epoch (4 of 4) was the best, val/recall@10 0.6000 -> 0.8000" in caplog.text
    assert "-o train.epochs=6" in caplog.text


@pytest.mark.parametrize("history, best_epoch, epochs, want", [
    ([(1, 0.3), (2, 0.5), (3, 0.6)], 3, 3, True),
    ([(1, 0.3), (2, 0.6), (3, 0.6)], 3, 3, False),  # a tie the validation loss broke: the metric has stopped
    ([(1, 0.3), (2, 0.6), (3, 0.5)], 2, 3, False),  # an earlier epoch was the best
    ([(1, 0.3), (2, 0.6)], 2, 3, False),  # max_steps ended the run before the schedule's last epoch
    ([(1, 0.6)], 1, 1, False),  # one epoch: nothing to compare with
])
def test_still_improving(history, best_epoch, epochs, want):
    val_history = [{"epoch": e, "step": 10 * e, "val/recall@10": v} for e, v in history]
    assert loop_mod.still_improving(val_history, "val/recall@10", best_epoch, epochs) is want


def test_select_metric_names_the_validation_metric_selection_follows(tiny_bert_dir, tmp_path, monkeypatch):
    """train.select_metric=mrr@10: the kept epoch is the one with the best MRR@10, where recall@10 peaks elsewhere."""
    recall, mrr = [0.3, 0.8, 0.5, 0.4], [0.2, 0.5, 0.7, 0.6]
    seen = []

    def fake_validate(encoder, *a, **k):
        seen.append(_adapter(encoder))
        return {"val/recall@10": recall[len(seen) - 1], "val/mrr@10": mrr[len(seen) - 1]}

    monkeypatch.setattr(loop_mod, "validate", fake_validate)
    enc = _encoder(tiny_bert_dir)
    res = train(enc, build_pair_source(toy_examples()), replace(CFG, select_metric="mrr@10"), LOSS, tmp_path,
                val=VAL, progress=False)
    assert res.best_epoch == 3 and res.best_metric == {"val/mrr@10": 0.7}
    assert all(torch.equal(_adapter(enc)[k], seen[2][k]) for k in seen[2])


def test_patience_stops_training_when_the_metric_stops_improving(tiny_bert_dir, tmp_path, monkeypatch):
    seen = _scripted(monkeypatch, [0.6, 0.5, 0.55, 0.9, 0.9, 0.9])
    enc = _encoder(tiny_bert_dir)
    res = train(enc, build_pair_source(toy_examples()), replace(CFG, epochs=6, patience=2), LOSS, tmp_path, val=VAL,
                progress=False)
    assert len(seen) == 3 and res.epochs_done == 3 and res.steps == 18  # epochs 2 and 3 were no better than 1
    assert res.stopped_early and res.best_epoch == 1
    assert all(torch.equal(_adapter(enc)[k], seen[0][k]) for k in seen[0])
    # Resuming a run that stopped early trains no further.
    seen_again = _scripted(monkeypatch, [0.9] * 6, start=3)
    res = train(_encoder(tiny_bert_dir), build_pair_source(toy_examples()), replace(CFG, epochs=6, patience=2), LOSS,
                tmp_path, val=VAL, resume=True, progress=False)
    assert not seen_again and res.steps == 18 and res.best_epoch == 1


def test_resume_selects_as_the_uninterrupted_run(tiny_bert_dir, tmp_path, monkeypatch):
    values = [0.3, 0.8, 0.5, 0.4]  # best at epoch 2, before the kill: the checkpoint must carry it
    _scripted(monkeypatch, values)
    full = _encoder(tiny_bert_dir, dropout=0.1)
    train(full, build_pair_source(toy_examples()), CFG, LOSS, tmp_path / "full", val=VAL, progress=False)

    real_save, saves = loop_mod.save_checkpoint, []

    def save_then_die(path, *a, **k):
        real_save(path, *a, **k)
        saves.append(1)
        if len(saves) == 3:  # after epoch 3
            raise KeyboardInterrupt

    _scripted(monkeypatch, values)
    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_encoder(tiny_bert_dir, dropout=0.1), build_pair_source(toy_examples()), CFG, LOSS, tmp_path / "resumed",
              val=VAL, progress=False)
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "progress.json").read_text())["epoch"] == 3

    _scripted(monkeypatch, values, start=3)
    resumed = _encoder(tiny_bert_dir, dropout=0.1)
    res = train(resumed, build_pair_source(toy_examples()), CFG, LOSS, tmp_path / "resumed", val=VAL, resume=True,
                progress=False)
    assert res.best_epoch == 2 and res.epochs_done == 4
    a, b = _adapter(full), _adapter(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def _labeled_files(tmp_path):
    """A labeled train file (6 labels x 12 texts) and an eval file whose texts appear nowhere else."""
    import csv

    words = ["apple", "samsung", "bosch", "canon", "intel", "miele"]
    rng = np.random.default_rng(0)
    rows = [(f"{w} {' '.join(rng.choice(['tv', 'pro', 'max', 'mini', 'black'], 2))} item {j}", w)
            for w in words for j in range(12)]
    evals = [(f"{w} eval text number {j}", w) for w in words for j in range(3)]
    for name, data in (("train.csv", rows), ("eval.csv", evals)):
        with open(tmp_path / name, "w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *data])
    return tmp_path / "train.csv", tmp_path / "eval.csv", {t for t, _ in evals}


def test_the_eval_split_is_read_only_by_the_evaluations(tiny_bert_dir, tmp_path, monkeypatch):
    """Validation and selection never embed an eval text: every eval text the model sees, it sees inside
    evaluate_encoder (the base model's evaluation, and the final one after training)."""
    import embedft.evaluation.tasks as tasks
    from embedft.config import config_from_dict
    from embedft.modeling.encoder import Encoder
    from embedft.recipes.train import run_train

    train_csv, eval_csv, eval_texts = _labeled_files(tmp_path)
    phase, leaks, evaluations = {"in_eval": False}, [], []
    real_eval, real_tok, real_enc = tasks.evaluate_encoder, Encoder.tokenize, Encoder.encode

    def spy_eval(*a, **k):
        phase["in_eval"] = True
        try:
            evaluations.append(1)
            return real_eval(*a, **k)
        finally:
            phase["in_eval"] = False

    def spy(real):
        def wrapped(self, texts, *a, **k):
            if not phase["in_eval"]:
                leaks.extend(t for t in texts if t in eval_texts)
            return real(self, texts, *a, **k)
        return wrapped

    monkeypatch.setattr(tasks, "evaluate_encoder", spy_eval)
    monkeypatch.setattr(Encoder, "tokenize", spy(real_tok))
    monkeypatch.setattr(Encoder, "encode", spy(real_enc))
    cfg = config_from_dict({"name": "sel", "model": {"name": str(tiny_bert_dir)},
                            "data": {"train": str(train_csv), "eval": str(eval_csv), "split": "given"},
                            "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "output_dir": str(tmp_path / "run"),
                                      "val_fraction": 0.25},
                            "eval": {"knn_k": 3}, "tracking": {"enabled": False}})
    summary = run_train(cfg, progress=False)
    assert len(evaluations) == 2 and leaks == []
    # Validation followed the labeled task's metric on texts carved out of the training file.
    report = json.loads((tmp_path / "run" / "checkpoint" / "progress.json").read_text())
    assert [set(v) >= {"val/macro_f1", "val/accuracy"} for v in report["val_history"]] == [True] * 3
    assert summary["best_epoch"] in (1, 2, 3) and summary["metrics"]["train/best_epoch"] == summary["best_epoch"]
    # Whether the last epoch was still the best (more epochs may pay), in the summary and among the metrics.
    f1 = [v["val/macro_f1"] for v in report["val_history"]]
    want = summary["best_epoch"] == 3 and f1[2] > f1[1]
    assert summary["still_improving"] is want and summary["metrics"]["train/still_improving"] == float(want)
    assert summary["suggested_epochs"] == (5 if want else None)
    # Every validation metric of the kept epoch is logged beside the one selected on.
    kept = report["val_history"][summary["best_epoch"] - 1]
    assert {k: summary["metrics"][f"train/best_{k}"] for k in ("val/macro_f1", "val/accuracy")} == \
        {k: kept[k] for k in ("val/macro_f1", "val/accuracy")}


@pytest.mark.parametrize("shape, want", [("labeled", "groups"), ("grouped", "random")])
def test_the_loop_draws_group_batches_for_labeled_data_by_default(tiny_bert_dir, tmp_path, monkeypatch, shape, want):
    from embedft.data.examples import Examples

    ex = toy_examples()
    if shape == "labeled":
        ex = Examples("labeled", "toy", ex.rows, ex.texts, groups=ex.groups, labels=ex.groups)
    drawn = []

    def record(src, batch_size, seed, epoch, sampling, *a, **k):
        drawn.append(sampling)
        raise KeyboardInterrupt  # the sampling is all this test needs

    monkeypatch.setattr(loop_mod, "epoch_batches", record)
    with pytest.raises(KeyboardInterrupt):
        train(_encoder(tiny_bert_dir), build_pair_source(ex), TrainConfig(batch_size=8), LOSS, tmp_path, progress=False)
    assert TrainConfig().batch_sampling == "auto" and drawn == [want]


def test_epochs_auto_trains_5_epochs_on_grouped_data(tiny_bert_dir, tmp_path):
    src = build_pair_source(toy_examples())  # 48 grouped texts: 6 batches of 8 an epoch
    res = train(_encoder(tiny_bert_dir), src, replace(CFG, epochs="auto"), LOSS, tmp_path, progress=False)
    assert src.shape == "grouped" and (res.epochs_done, res.steps) == (5, 30)


def test_epochs_auto_is_recorded_as_the_number_it_meant(tiny_bert_dir, tmp_path, caplog):
    """A labeled run with no train.epochs: 3 epochs, and its config.yaml says 3, not auto (MLflow's params alike)."""
    from embedft.config import config_from_dict, load_config
    from embedft.recipes.train import run_train

    train_csv, eval_csv, _ = _labeled_files(tmp_path)
    cfg = config_from_dict({"name": "auto", "model": {"name": str(tiny_bert_dir)},
                            "data": {"train": str(train_csv), "eval": str(eval_csv), "split": "given"},
                            "train": {"batch_size": 16, "output_dir": str(tmp_path / "run"), "max_steps": 2},
                            "eval": {"knn_k": 3}, "tracking": {"enabled": False}})
    assert cfg.train.epochs == "auto"
    with caplog.at_level("INFO", logger="embedft.recipes.train"):
        run_train(cfg, progress=False)
    assert "train.epochs=auto: 3 epochs for labeled data" in caplog.text
    assert load_config(tmp_path / "run" / "config.yaml").train.epochs == 3
