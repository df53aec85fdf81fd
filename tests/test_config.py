"""Config: defaults, every experiment YAML, unknown keys, impossible values, -o overrides."""

import re
from pathlib import Path

import pytest
import yaml

from embedft.config import (
    DataConfig,
    ExperimentConfig,
    LoraConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    parse_override,
    resolve_epochs,
    to_yaml,
)
from embedft.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def test_defaults_construct_and_load_config_none_gives_them():
    cfg = load_config(None)
    assert cfg == ExperimentConfig()
    assert cfg.train.lr == 1e-3 and cfg.train.epochs == "auto" and cfg.lora.r == 16 and cfg.data.shape == "labeled"
    assert cfg.output_dir == Path("runs/default")


def test_epochs_auto_means_3_for_labeled_data_and_5_for_grouped_and_pairs_data():
    assert [resolve_epochs("auto", shape) for shape in ("labeled", "grouped", "pairs")] == [3, 5, 5]
    assert resolve_epochs(2, "pairs") == 2  # a number is itself, whatever the shape
    for shape in ("labeled", "grouped", "pairs"):  # every shape the data config accepts has its number
        assert resolve_epochs(load_config(None, [f"data.shape={shape}"]).train.epochs, shape) >= 1
    cfg = load_config(None, ["train.epochs=auto", "train.max_steps=4"])
    assert cfg.train.epochs == "auto"
    for bad in ("five", 0, -1):
        with pytest.raises(ConfigError, match=r"train.epochs: must be a number >= 1 or auto"):
            load_config(None, [f"train.epochs={bad}"])


def test_experiments_folder_has_yamls():
    assert len(EXPERIMENTS) >= 1


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_loads_and_round_trips(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.name == raw["name"]
    # What the YAML sets is what the config holds (the YAML only overrides defaults).
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                got = getattr(getattr(cfg, section), key)
                assert (list(got) if isinstance(got, tuple) else got) == value, f"{section}.{key}"
    assert config_from_dict(yaml.safe_load(to_yaml(cfg))) == cfg


def test_round_trip_keeps_int_columns_and_tuples():
    cfg = load_config(None, ["data.text_column=1", "data.shape=pairs", "data.negative_columns=[neg1, 3]",
                             "lora.target_modules=[q,v]", "data.header=false"])
    assert cfg.data.text_column == 1 and cfg.data.negative_columns == ("neg1", 3)
    assert config_from_dict(yaml.safe_load(to_yaml(cfg))) == cfg


# -- unknown keys --------------------------------------------------------------------------


def test_unknown_top_level_key_lists_sections():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"trian": {"lr": 1e-4}})
    msg = str(e.value)
    assert "trian: unknown key" in msg and "did you mean 'train'" in msg
    for section in ("data", "model", "lora", "loss", "train", "eval", "tracking", "export"):
        assert section in msg


def test_unknown_key_in_section_suggests_the_right_one():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"train": {"learning_rate": 1e-4}})
    msg = str(e.value)
    assert msg.startswith("train.learning_rate: unknown key")
    assert "did you mean 'lr'" in msg
    assert "valid keys:" in msg and "batch_size" in msg and "warmup_steps" in msg


def test_unknown_key_typo_suggests_close_name():
    with pytest.raises(ConfigError, match=r"lora\.alhpa: unknown key \(did you mean 'alpha'\?\)"):
        config_from_dict({"lora": {"alhpa": 8}})


# -- impossible values -------------------------------------------------------------------


@pytest.mark.parametrize("values, field, needle", [
    ({"train": {"lr": -1e-4}}, "train.lr", "must be > 0"),
    ({"train": {"lr": float("nan")}}, "train.lr", "must be > 0"),
    ({"lora": {"r": 0}}, "lora.r", "rank must be >= 1"),
    ({"lora": {"alpha": float("inf")}}, "lora.alpha", "must be a finite number > 0"),
    ({"train": {"weight_decay": float("inf")}}, "train.weight_decay", "must be a finite number >= 0"),
    ({"export": {"min_cosine": 2}}, "export.min_cosine", "must be in (0, 1]"),
    ({"export": {"max_abs_diff": -1e-5}}, "export.max_abs_diff", "must be a finite number >= 0"),
    ({"train": {"max_steps": 5, "warmup_steps": 10}}, "train.warmup_steps", "longer than training"),
    ({"train": {"batch_size": 1}}, "train.batch_size", "must be >= 2"),
    ({"train": {"scheduler": "exponential"}}, "train.scheduler", "linear, cosine or constant"),
    ({"train": {"batch_sampling": "hard"}}, "train.batch_sampling", "auto, random, by_label, groups or similar_groups"),
    ({"train": {"group_size": 1}}, "train.group_size", "must be >= 2"),
    ({"train": {"epochs": "two"}}, "train.epochs", "must be a number >= 1 or auto (by the data's shape), got 'two'"),
    ({"train": {"epochs": 1.5}}, "train.epochs", "expected an integer"),
    ({"data": {"on_duplicate": "ignore"}}, "data.on_duplicate", "must be one of"),
    ({"data": {"split": "given"}}, "data.eval", "needs an eval file"),
    ({"data": {"eval": "e.csv"}}, "data.eval", "split=hash ignores it"),
    ({"data": {"shape": "grouped", "negative_columns": ["neg"]}}, "data.negative_columns", "shape=grouped ignores"),
    ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction", "must be in (0, 1)"),
    ({"model": {"query_instruction": "Query: {task}"}}, "model.query_instruction", "must contain {text}"),
    ({"loss": {"temperature": 0}}, "loss.temperature", "must be in (0, 1]"),
    ({"tracking": {"enabled": "yes"}}, "tracking.enabled", "expected true or false"),
    ({"lora": {"target_modules": []}}, "lora.target_modules", "non-empty"),
    ({"lora": {"targets": "ffn"}}, "lora.targets", "use qkv or all"),
    ({"lora": {"dropout": 1.0}}, "lora.dropout", "must be in [0, 1)"),
    ({"model": {"max_length": 3}}, "model.max_length", "must be >= 4"),
    ({"train": {"mini_batch_size": 0}}, "train.mini_batch_size", "must be >= 1"),
    ({"train": {"warmup_ratio": 1.0}}, "train.warmup_ratio", "must be in [0, 1)"),
    ({"name": "a/b"}, "name", "without '/'"),
    ({"name": ".."}, "name", "not . or .."),
    ({"eval": {"precision": "fp16"}}, "eval.precision", "use auto, fp32 or bf16"),
    ({"train": {"device": "cuda:x"}}, "train.device", "cuda:N"),
    ({"train": {"threads": 0}}, "train.threads", "must be >= 1 or null"),
    ({"train": {"checkpoint_every": 0}}, "train.checkpoint_every", "must be >= 1 or null"),
    ({"train": {"output_dir": "runs/{nam}"}}, "train.output_dir", "the only placeholder is {name}"),
    ({"train": {"output_dir": "runs/{name"}}, "train.output_dir", "the only placeholder is {name}"),
    ({"train": {"base_quantization": "nf8"}}, "train.base_quantization", "use nf4, int8 or null"),
    ({"train": {"select_metric": "recall@5"}}, "train.select_metric", "use auto, macro_f1, accuracy (labeled data) "
                                                                     "or recall@10, r_cap@10, mrr@10, ndcg@10"),
    ({"train": {"select_metric": "mrr@10"}}, "train.select_metric", "mrr@10 is not measured on labeled data's "
                                                                   "validation (kNN classification"),
    ({"data": {"shape": "pairs", "positive_column": "p"}, "train": {"select_metric": "macro_f1"}},
     "train.select_metric", "use auto or one of recall@10, r_cap@10, mrr@10, ndcg@10"),
    ({"train": {"base_quantization": "nf4", "base_dtype": "fp32"}}, "train.base_dtype",
     "set -o train.base_dtype=auto, or -o train.base_quantization=null"),
])
def test_impossible_values_name_the_field(values, field, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict(values)
    msg = str(e.value)
    assert msg.startswith(f"{field}: "), msg
    assert needle in msg


def test_dataclasses_validate_when_built_directly():
    with pytest.raises(ConfigError, match="train.warmup_steps"):
        TrainConfig(max_steps=5, warmup_steps=6)
    assert TrainConfig(max_steps=5, warmup_steps=5).warmup_steps == 5
    with pytest.raises(ConfigError, match="lora.r"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match="data.group_column"):
        DataConfig(shape="grouped", group_column=None)


def test_values_at_the_edges_of_their_ranges_are_accepted():
    cfg = config_from_dict({"loss": {"temperature": 1.0, "label_temperature": 1.0}, "lora": {"dropout": 0.0},
                            "export": {"min_cosine": 1.0, "max_abs_diff": 0.0}, "model": {"max_length": 4},
                            "train": {"epochs": 2.0, "warmup_ratio": 0.0, "mini_batch_size": 1}})
    assert cfg.loss.temperature == 1.0 and cfg.model.max_length == 4 and cfg.train.mini_batch_size == 1
    assert cfg.train.epochs == 2 and type(cfg.train.epochs) is int  # YAML's 2.0 is the integer 2


def test_base_quantization_reads_null_and_none_as_unquantised():
    for given, meant in ((None, None), ("none", None), ("nf4", "nf4"), ("int8", "int8")):
        cfg = load_config(None, [f"train.base_quantization={'null' if given is None else given}"])
        assert cfg.train.base_quantization == given and cfg.train.quantization == meant  # logged as given
    assert TrainConfig().quantization is None
    assert TrainConfig(base_quantization="int8", base_dtype="bf16").quantization == "int8"


def test_configs_are_frozen():
    cfg = ExperimentConfig()
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


# -- overrides ---------------------------------------------------------------------------


def test_override_scientific_lr_is_a_float():
    cfg = load_config(None, ["train.lr=1e-4"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1e-4


def test_override_list_gives_a_tuple():
    cfg = load_config(None, ["lora.target_modules=[q,k]"])
    assert cfg.lora.target_modules == ("q", "k")
    cfg = load_config(None, ["eval.ks=10", "lora.target_modules=query"])  # one value: a list of one
    assert cfg.eval.ks == (10,) and cfg.lora.target_modules == ("query",)


def test_override_values_are_typed():
    cfg = load_config(None, ["train.epochs=3", "tracking.enabled=false", "data.train=data/x.csv",
                             "train.max_steps=null", "model.name=minilm"])
    assert cfg.train.epochs == 3 and cfg.tracking.enabled is False and cfg.data.train == "data/x.csv"
    assert cfg.train.max_steps is None
    assert parse_override("a.b = 2") == (["a", "b"], 2)
    assert parse_override("x=") == (["x"], None)
    assert parse_override("data.train=data/k=v.csv") == (["data", "train"], "data/k=v.csv")  # the first = splits


def test_override_applies_on_top_of_yaml(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("name: exp\ntrain:\n  lr: 5.0e-4\n  epochs: 2\n")
    cfg = load_config(p, ["train.lr=1e-3"])
    assert (cfg.name, cfg.train.lr, cfg.train.epochs) == ("exp", 1e-3, 2)


def test_override_nested_unknown_key_rejected():
    with pytest.raises(ConfigError, match=r"train\.foo: unknown key"):
        load_config(None, ["train.foo.bar=1"])
    with pytest.raises(ConfigError, match=r"lora\.rank: unknown key \(did you mean 'r'\?\)"):
        load_config(None, ["lora.rank=8"])


def test_a_bad_override_is_named_in_the_error(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("train:\n  lr: 5.0e-4\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml \(-o train\.lr=abc\): train\.lr: expected a number, got 'abc'"):
        load_config(p, ["train.epochs=2", "train.lr=abc"])
    with pytest.raises(ConfigError, match=r"\(-o train\.lr=-1\): train\.lr: learning rate must be > 0"):
        load_config(p, ["train.lr=-1"])  # a value check too
    with pytest.raises(ConfigError, match=r"^config \(-o train\.foo\.bar=1\): train\.foo: unknown key"):
        load_config(None, ["train.foo.bar=1"])
    # An error about two keys names the options that set either, the last of each (the one in force).
    with pytest.raises(ConfigError, match=r"^config \(-o train\.batch_sampling=groups, -o loss\.symmetric=true\): "
                                          r"loss\.symmetric=true is not used with train\.batch_sampling=groups"):
        load_config(None, ["train.batch_sampling=random", "train.batch_sampling=groups", "train.lr=1e-4",
                           "loss.symmetric=true"])
    p.write_text("train:\n  lr: abc\n")  # set by the file, not by an option: the file alone is named
    with pytest.raises(ConfigError, match=r"exp\.yaml: train\.lr: expected a number"):
        load_config(p, ["train.epochs=2"])


def test_override_into_a_value_is_rejected(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("train:\n  lr: 5.0e-4\n")
    with pytest.raises(ConfigError, match="lr is not a section"):
        load_config(p, ["train.lr.x=1"])


def test_malformed_override_rejected():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.lr"])


@pytest.mark.parametrize("item, message", [
    ("=3", "empty key name"),
    ("train..lr=1e-4", "empty key name"),
    ("eval.ks=[1,5", "the value is not valid YAML"),
])
def test_override_without_a_key_or_with_bad_yaml_is_named(item, message):
    with pytest.raises(ConfigError, match=rf"override '{re.escape(item)}': {message}"):
        load_config(None, [item])


def test_override_bad_value_names_field():
    with pytest.raises(ConfigError, match=r"train\.lr: learning rate must be > 0, got -1"):
        load_config(None, ["train.lr=-1"])


# -- files -------------------------------------------------------------------------------


def test_missing_config_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(missing)
    assert str(missing) in str(e.value) and "not found" in str(e.value)


def test_invalid_yaml_and_non_mapping_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)


def test_non_utf8_config_and_a_folder_are_named_not_a_traceback(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte b'\\xe9' at offset 9\); save it as UTF-8"):
        load_config(bad)
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_config(tmp_path)


def test_a_key_given_twice_is_refused_not_silently_replaced(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("name: x\ntrain:\n  lr: 1.0e-3\nlora:\n  r: 8\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: key 'train' appears twice in one section \(lines 2 and 6\)"):
        load_config(p)
    p.write_text("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"key 'lr' appears twice in one section \(lines 2 and 3\)"):
        load_config(p)


def test_error_in_file_names_the_file(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("lora:\n  r: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: lora.r:")


def test_mining_settings_are_checked_with_the_option_and_the_fix():
    assert load_config(None, ["loss.hard_negatives=2", "loss.mine_every=epoch"]).loss.mine_every == "epoch"
    assert load_config(None, ["loss.hard_negatives=2", "loss.mine_every=50"]).loss.mine_every == 50
    # Mined negatives now go with group batches too (extra candidates of each text).
    assert load_config(None, ["train.batch_sampling=groups", "loss.hard_negatives=2"]).loss.hard_negatives == 2
    assert load_config(None, ["train.batch_sampling=similar_groups", "loss.mine_every=epoch"]).loss.hard_negatives == 0
    for opt, needle in (("loss.mine_every=0", "loss.mine_every: must be null (mine once), a number of steps >= 1, or epoch"),
                        ("loss.mine_every=weekly", "loss.mine_every: must be null"),
                        ("loss.mine_relative_margin=1.5", "loss.mine_relative_margin: must be in [0, 1) or null"),
                        ("loss.mine_absolute_margin=-0.1", "loss.mine_absolute_margin: must be a finite number >= 0"),
                        ("loss.mine_range_min=-1", "loss.mine_range_min: must be >= 0"),
                        ("loss.mine_range_max=1", "loss.mine_range_max: must be >= loss.mine_range_min + "
                                                  "loss.hard_negatives (2) or null, got 1")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config(None, ["loss.hard_negatives=2", opt])
    with pytest.raises(ConfigError, match=r"loss.mine_every=10 has nothing to mine: .*set -o loss.hard_negatives=N"):
        load_config(None, ["loss.mine_every=10"])
    assert load_config(None, ["loss.hard_negatives=1", "loss.mine_every=epoch", "loss.mine_from_steps=true"]
                       ).loss.mine_from_steps
    for opts in (["loss.hard_negatives=1"], ["train.batch_sampling=similar_groups", "loss.mine_every=epoch"]):
        with pytest.raises(ConfigError, match=r"loss.mine_from_steps=true .* refresh none; set -o "
                                              r"loss.hard_negatives=1 -o loss.mine_every=epoch"):
            load_config(None, opts + ["loss.mine_from_steps=true"])


def test_by_label_batches_of_labeled_data_are_refused_without_negatives():
    # Labeled data: one label per batch makes every in-batch candidate the anchor's positive.
    with pytest.raises(ConfigError, match=r"train\.batch_sampling=by_label on labeled data .* the loss is 0 .*"
                                          r"train\.batch_sampling=groups.*loss\.hard_negatives=1") as e:
        config_from_dict({"data": {"shape": "labeled"}, "train": {"batch_sampling": "by_label"}})
    assert e.value.keys == ("train.batch_sampling", "loss.hard_negatives")
    # With mined negatives from other labels it trains; grouped data has other groups of the label as negatives.
    config_from_dict({"data": {"shape": "labeled"}, "train": {"batch_sampling": "by_label"},
                      "loss": {"hard_negatives": 1}})
    config_from_dict({"data": {"shape": "grouped"}, "train": {"batch_sampling": "by_label"}})


def test_why_by_label_cannot_train_labeled_data():
    # The loss the refusal above spares the user: every candidate but the anchor's own positive shares
    # its key, so it is masked and the softmax has one finite logit: exactly 0 whatever the weights.
    import torch

    from embedft.training.losses import false_negative_mask, info_nce

    torch.manual_seed(0)
    a, p = (torch.nn.functional.normalize(torch.randn(6, 8), dim=1) for _ in range(2))
    keys, ids = torch.zeros(6, dtype=torch.long), torch.arange(6)
    same = false_negative_mask(keys, keys, ids, ids + 6)
    assert float(info_nce(a, p, exclude=same)) == 0.0
    other = false_negative_mask(keys, torch.cat([keys, torch.ones(6, dtype=torch.long)]), ids, torch.arange(6, 18))
    assert float(info_nce(a, p, torch.nn.functional.normalize(torch.randn(6, 8), dim=1), exclude=other)) > 0.1


def test_selection_without_a_validation_split_is_refused_naming_the_fix():
    with pytest.raises(ConfigError, match=r"train.select_best: needs a validation split, and train.val_fraction=0 has "
                                          r"none; set -o train.val_fraction=0.1, or -o train.select_best=false"):
        TrainConfig(val_fraction=0.0)
    with pytest.raises(ConfigError, match=r"train.patience: needs a validation split.*-o train.patience=null"):
        TrainConfig(val_fraction=0.0, select_best=False)
    TrainConfig(val_fraction=0.0, select_best=False, patience=None)
    with pytest.raises(ConfigError, match=r"train.val_fraction: must be in \[0, 1\), got 1.0"):
        TrainConfig(val_fraction=1.0)
    with pytest.raises(ConfigError, match=r"train.patience: must be >= 1 or null"):
        TrainConfig(patience=0)


def test_batch_sampling_auto_means_groups_for_labeled_data_only():
    from embedft.config import resolve_batch_sampling

    assert TrainConfig().batch_sampling == "auto"
    assert [resolve_batch_sampling("auto", s) for s in ("labeled", "grouped", "pairs")] == ["groups", "random", "random"]
    assert resolve_batch_sampling("random", "labeled") == "random"  # a setting given is kept
    # What group batches cannot take is refused for auto too, naming what auto meant and the way out.
    with pytest.raises(ConfigError, match=r"loss.symmetric=true is not used with train.batch_sampling=groups "
                                          r"\(train.batch_sampling=auto means groups for labeled data\).*"
                                          r"-o train.batch_sampling=random"):
        config_from_dict({"data": {"shape": "labeled"}, "loss": {"symmetric": True}})
    # Mined negatives go with group batches too (extra candidates of each text).
    config_from_dict({"data": {"shape": "labeled"}, "loss": {"hard_negatives": 2}})
    config_from_dict({"data": {"shape": "grouped"}, "loss": {"hard_negatives": 2}})  # auto: random pairs
    config_from_dict({"data": {"shape": "labeled"}, "loss": {"hard_negatives": 2}, "train": {"batch_sampling": "random"}})
