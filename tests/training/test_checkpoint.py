"""What a checkpoint must be resumed with: the run identity and the check against it, without a model."""

import json
from dataclasses import fields, replace

import numpy as np
import pytest

from embedft.config import LossConfig, TrainConfig
from embedft.data.batches import build_pair_source
from embedft.data.examples import Examples
from embedft.errors import ConfigError
from embedft.modeling.encoder import EncoderSpec
from embedft.training.checkpoint import check_resumable, run_identity

SPEC = EncoderSpec(base_model="tiny", model_path="/m", model_type="bert", family="bert", pooling="mean",
                   normalize=True, padding_side="right", query_template=None, max_length=128, hidden_size=32,
                   fingerprint="abc123")
# The settings a resumed run may change (they do not alter what is trained or in which order).
MAY_CHANGE = {"threads", "log_every", "device", "output_dir", "compile",
              "checkpoint_every"}


def _src(n_groups=4):
    rows = [(f"t{g}-{j}", f"g{g}") for g in range(n_groups) for j in range(2)]
    return build_pair_source(Examples("grouped", "mem", np.arange(len(rows)) + 2, [r[0] for r in rows],
                                      groups=[r[1] for r in rows]))


def _ident(spec=SPEC, src=None, cfg=TrainConfig(), loss=LossConfig(), lora=None):
    return run_identity(spec, lora if lora is not None else {"r": 4}, src or _src(), cfg, loss)


def test_identity_holds_every_setting_that_changes_what_is_trained():
    ident = _ident()
    train_keys = {k[len("train."):] for k in ident if k.startswith("train.")}
    assert train_keys == {f.name for f in fields(TrainConfig)} - MAY_CHANGE
    assert {k[len("loss."):] for k in ident if k.startswith("loss.")} == {f.name for f in fields(LossConfig)}
    json.dumps(ident)  # stored in progress.json as is
    # Each way a text embeds, the base weights, LoRA and the data change the identity.
    for other in (replace(SPEC, pooling="cls"), replace(SPEC, normalize=False), replace(SPEC, max_length=64),
                  replace(SPEC, query_template="query: {text}"), replace(SPEC, fingerprint="def456")):
        assert _ident(spec=other) != ident, other
    assert _ident(lora={"r": 8}) != ident
    assert _ident(src=_src(5)) != ident
    assert _ident(cfg=TrainConfig(warmup_steps=5)) != ident and _ident(cfg=TrainConfig(seed=1)) != ident
    assert _ident(cfg=TrainConfig(threads=2, log_every=1, checkpoint_every=7)) == ident


def test_check_resumable_names_each_changed_setting(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"")
    saved = _ident()
    (tmp_path / "progress.json").write_text(json.dumps({"identity": saved}))
    check_resumable(tmp_path, saved)  # same settings: fine
    check_resumable(tmp_path, _ident(cfg=TrainConfig(threads=3)))
    now = _ident(cfg=TrainConfig(lr=2e-4, batch_size=8), loss=LossConfig(temperature=0.1))
    with pytest.raises(ConfigError) as e:
        check_resumable(tmp_path, now)
    msg = str(e.value)
    for part in ("loss.temperature: 0.05 there, 0.1 now", "train.batch_size: 64 there, 8 now",
                 "train.lr: 0.001 there, 0.0002 now"):
        assert part in msg
    # A key this embedft records but an older checkpoint lacks is not checked.
    (tmp_path / "progress.json").write_text(json.dumps({"identity": {k: v for k, v in saved.items()
                                                                      if k != "train.lr"}}))
    check_resumable(tmp_path, _ident(cfg=TrainConfig(lr=1e-3)))


def test_a_checkpoint_loads_weights_only_and_one_with_pickled_objects_is_refused(tmp_path):
    import pickle

    import torch

    from embedft.training.checkpoint import _numpy_rng_state, _read_checkpoint, _set_numpy_rng_state

    np.random.seed(7)
    state = _numpy_rng_state()
    want = np.random.rand(3)
    torch.save({"numpy": state}, tmp_path / "ok.pt")
    loaded = torch.load(tmp_path / "ok.pt", weights_only=True)["numpy"]  # no ndarray, no arbitrary object
    _set_numpy_rng_state(loaded)
    assert np.array_equal(np.random.rand(3), want)

    (tmp_path / "old.pt").write_bytes(pickle.dumps({"numpy": np.random.get_state()}, protocol=2))  # an ndarray inside
    with pytest.raises(ConfigError, match="holds objects a safe load refuses"):
        _read_checkpoint(tmp_path, lambda: torch.load(tmp_path / "old.pt", weights_only=True))
