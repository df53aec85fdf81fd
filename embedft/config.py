"""Typed, frozen configuration: the only place defaults live.

An experiment YAML is one of these dataclasses written down; `-o key=value` on the
command line overrides the YAML. Everything is validated here, before any model or
data is loaded, with messages that name the field and the fix. docs/config.md is
generated from these classes (`make config-docs`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from embedft.errors import ConfigError

Column = Union[str, int]
POLICIES = ("error", "warn", "drop")
FORMATS = ("csv", "tsv", "jsonl", "parquet", "disk", "hub")  # data.format's values: embedft.data.readers.READERS
# train.batch_sampling values that lay whole groups in a batch (every text an anchor).
GROUP_SAMPLINGS = ("groups", "similar_groups")
# MLflow's stores by URI scheme (a path without one is a local folder store); a database scheme may
# name its driver (postgresql+psycopg2://...).
TRACKING_SCHEMES = ("file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc",
                    "uc")


def tracking_uri_problem(uri: str) -> str | None:
    """Why MLflow cannot use `uri` as a tracking store, judged by its scheme alone; None when it may."""
    if "://" not in uri:
        return None if uri.strip() else "empty; give a store URI or a folder"
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme in TRACKING_SCHEMES:
        return None
    return (f"MLflow cannot track to a {scheme}:// store; use http(s)://HOST:PORT (a tracking server), "
            "sqlite:///PATH.db, a folder, or a database URI (postgresql://, mysql://, mssql://), "
            "or -o tracking.enabled=false")


DEVICES = "auto, cpu, cuda or cuda:N (N = 0, 1, ...)"  # what train.device and --device accept


# train.epochs=auto by the data's shape (`resolve_epochs`): labeled proxies peaked at epochs 1-3 of 3 and 5 did not
# pay on their validation; grouped and pairs data kept the last of 3 epochs, and 5 raised validation recall@10 on
# offer matching, product search and catalog matching, both seeds each (docs/benchmarks.md, "train.epochs: auto").
AUTO_EPOCHS = {"labeled": 3, "grouped": 5, "pairs": 5}


def resolve_epochs(epochs: int | str, shape: str) -> int:
    """What train.epochs=auto means for data of this shape (`AUTO_EPOCHS`); a number stays itself."""
    return AUTO_EPOCHS[shape] if epochs == "auto" else int(epochs)


def resolve_batch_sampling(sampling: str, shape: str) -> str:
    """What train.batch_sampling=auto means for data of this shape: `groups` for labeled data (batches
    with several texts of each of many labels: every same-label text a positive, every other one a
    negative, the supervised contrastive setting), `random` pairs for grouped and pairs data."""
    if sampling != "auto":
        return sampling
    return "groups" if shape == "labeled" else "random"


# train.select_metric's values (validation metrics, higher is better): kNN classification for labeled data,
# retrieval at 10 for grouped and pairs data.
LABELED_SELECT_METRICS = ("macro_f1", "accuracy")
RETRIEVAL_SELECT_METRICS = ("recall@10", "r_cap@10", "mrr@10", "ndcg@10")


def resolve_select_metric(metric: str, labeled: bool) -> str:
    """The validation key that train.select_metric names (`val/...`): auto means kNN macro-F1 for labeled data and
    recall@10 for grouped and pairs data."""
    if metric == "auto":
        metric = "macro_f1" if labeled else "recall@10"
    return f"val/{metric}"


def is_device(name: str) -> bool:
    """Whether `name` is one of DEVICES (auto: CUDA when there is one, else the CPU)."""
    return name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", name) is not None


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {msg}", (field_name,))


def _check_folder_template(template: str, name: str, option: str, example: str) -> None:
    """A folder setting whose only placeholder is {name} must fill in; else a ConfigError naming `option`."""
    try:
        template.format(name=name)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{option}: {template!r} cannot be filled in ({type(e).__name__}: {e}); the only "
                          f"placeholder is {{name}}, e.g. {example}/{{name}}", (option,)) from None


def _check_policy(section: str, name: str, value: str) -> None:
    _check(value in POLICIES, f"{section}.{name}", f"must be one of {POLICIES}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from, their shape, the split and the validation policy."""

    train: str | None = None  # CSV/TSV/JSONL/Parquet file, save_to_disk folder, or hub name
    eval: str | None = None  # given eval file; None = deterministic split of `train`
    format: str = "auto"  # auto|csv|tsv|jsonl|parquet|disk|hub
    header: bool = True  # CSV/TSV only: False when the file has no header row
    hub_split: str = "train"  # for format=hub
    # labeled: (text, label); grouped: (text, group[, label]); pairs: (query, positive[, negatives])
    shape: str = "labeled"
    text_column: Column = "text"  # labeled/grouped: the text to embed
    label_column: Column | None = "label"  # class label (labeled: positives share it; kNN classification)
    group_column: Column | None = "group"  # grouped: positives share it (e.g. the product of an offer)
    query_column: Column = "query"  # pairs: the query
    positive_column: Column = "positive"  # pairs: its positive document
    negative_columns: tuple[Column, ...] = ()  # pairs: hard negative documents, one column each
    # given: `eval` file; hash: deterministic by text (labeled), group (grouped) or query (pairs);
    # modulo: eval when int(group) % split_modulo == 0
    split: str = "hash"
    # hash/modulo (and train.val_fraction) keep each value of this column on one side instead: e.g. the
    # product of labeled offers, so no product is on both sides. null = as above.
    split_column: Column | None = None
    eval_fraction: float = 0.2  # split=hash: share of labels/groups that go to eval
    split_modulo: int = 5  # split=modulo: the divisor
    split_seed: int = 13  # seed of the hash split and of the subsampling
    max_train_rows: int | None = None  # subsample (deterministic) for quick runs
    max_eval_rows: int | None = None  # as max_train_rows, for the eval split
    # Validation policy per problem: error (default, names rows and this option), warn, drop.
    on_empty_text: str = "error"
    on_singleton: str = "error"  # label/group with a single example in train
    on_duplicate: str = "error"  # exact duplicate texts in train
    on_overlap: str = "error"  # identical text in train and eval

    def __post_init__(self) -> None:
        _check(self.split_seed >= 0, "data.split_seed", f"must be >= 0, got {self.split_seed}")
        _check(self.format in ("auto",) + FORMATS, "data.format",
               f"unknown format {self.format!r}; use auto, {', '.join(FORMATS)}")
        _check(self.shape in ("labeled", "grouped", "pairs"), "data.shape",
               f"unknown shape {self.shape!r}; use labeled, grouped or pairs")
        _check(self.split in ("given", "hash", "modulo"), "data.split",
               f"unknown split {self.split!r}; use given, hash or modulo")
        _check(0.0 < self.eval_fraction < 1.0, "data.eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
        _check(self.split_modulo >= 2, "data.split_modulo", f"must be >= 2, got {self.split_modulo}")
        if self.split == "given":
            _check(self.eval is not None, "data.eval", "split=given needs an eval file; set data.eval or use split=hash")
        else:
            _check(self.eval is None, "data.eval", f"is set ({self.eval!r}) but split={self.split} ignores it and "
                   "splits data.train instead; set data.split=given to evaluate on that file, or remove data.eval")
        if self.shape == "grouped":
            _check(self.group_column is not None, "data.group_column", "shape=grouped needs a group column")
        if self.shape == "labeled":
            _check(self.label_column is not None, "data.label_column", "shape=labeled needs a label column")
        if self.shape != "pairs":
            _check(not self.negative_columns, "data.negative_columns", f"only pairs data has negative columns; "
                   f"shape={self.shape} ignores them (set data.shape=pairs, or remove data.negative_columns; "
                   "loss.hard_negatives mines negatives from grouped and labeled data)")
        for n in ("max_train_rows", "max_eval_rows"):
            v = getattr(self, n)
            _check(v is None or v > 0, f"data.{n}", f"must be positive or null, got {v}")
        for n in ("on_empty_text", "on_singleton", "on_duplicate", "on_overlap"):
            _check_policy("data", n, getattr(self, n))


@dataclass(frozen=True)
class ModelConfig:
    """The base encoder and how it embeds text."""

    name: str = "minilm"  # hub id, local folder, or alias (minilm)
    family: str = "auto"  # auto|bert|decoder: decides pooling, padding side, prompts and LoRA targets
    pooling: str = "auto"  # auto (the model's own sentence-transformers config)|mean|cls|lasttoken
    max_length: int = 128  # tokens per text; longer texts are truncated
    normalize: bool = True  # L2-normalise embeddings (inner product = cosine)
    # Decoder embedders (Qwen3-Embedding): instruction applied to queries only.
    query_instruction: str | None = None  # e.g. "Instruct: {task}\nQuery:{text}"; null = family default
    task: str = "Given a query, retrieve relevant passages that answer the query"  # fills {task}
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, slower
    trust_remote_code: bool = False  # let transformers run the model repository's own code

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "must be set (hub id, local folder or 'minilm')")
        _check(self.family in ("auto", "bert", "decoder"), "model.family",
               f"unknown family {self.family!r}; use auto, bert or decoder")
        _check(self.pooling in ("auto", "mean", "cls", "lasttoken"), "model.pooling",
               f"unknown pooling {self.pooling!r}; use auto, mean, cls or lasttoken")
        _check(self.max_length >= 4, "model.max_length", f"must be >= 4, got {self.max_length}")
        if self.query_instruction is not None:
            _check("{text}" in self.query_instruction, "model.query_instruction",
                   "must contain {text} (and may contain {task})")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters; by default on the attention Q, K and V projections of the family."""

    r: int = 16  # rank of the low-rank update
    alpha: float = 32.0  # scale: the update is multiplied by alpha / r
    dropout: float = 0.05  # dropout on the LoRA layers' input
    # qkv: the family's attention Q, K and V projections; all: also the attention output and the
    # feed-forward layers of every block (BERT: attention.output.dense, intermediate.dense, output.dense;
    # decoders: o/gate/up/down_proj). all: PriceRunner matching validation recall@10 0.901 -> 0.915 at
    # 200 steps for 0.76x the samples/s on 2 CPU cores (docs/benchmarks.md, "LoRA on every linear layer").
    targets: str = "qkv"
    target_modules: tuple[str, ...] | None = None  # explicit module names (peft's target_modules); overrides targets

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", f"rank must be >= 1, got {self.r}")
        _check(0 < self.alpha < math.inf, "lora.alpha", f"must be a finite number > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.targets in ("qkv", "all"), "lora.targets", f"use qkv or all, got {self.targets!r}")
        if self.target_modules is not None:
            _check(len(self.target_modules) > 0, "lora.target_modules", "must be null or a non-empty list")


@dataclass(frozen=True)
class LossConfig:
    """The contrastive loss: InfoNCE over in-batch (and hard) negatives by default."""

    name: str = "infonce"  # a loss of embedft.training.losses.LOSSES
    temperature: float = 0.05  # a temperature: logits = cos / temperature (scale = 20)
    symmetric: bool = False  # add the positive->anchor direction
    hard_negatives: int = 0  # per anchor, from the data's negative columns (pairs), else mined (every batch kind)
    # Mining (hard_negatives > 0 without negative columns; similar_groups' neighbouring groups):
    # null = once, with the starting encoder; N = again with the current encoder after every N steps;
    # epoch = at each epoch's start. Refreshes happen at fixed steps and are checkpointed: --resume stays exact.
    mine_every: int | str | None = None
    # Positive-aware false-negative filter (NV-Retriever; sentence-transformers' mine_hard_negatives
    # names): drop a candidate scoring above p - |p| * relative_margin, p = the anchor's best positive
    # score. 0.05 keeps negatives below 95% of the positive's score; null = off.
    mine_relative_margin: float | None = 0.05
    mine_absolute_margin: float | None = None  # also drop candidates scoring above p - absolute_margin; null = off
    mine_range_min: int = 0  # skip this many nearest eligible candidates (sentence-transformers' range_min)
    # Nearest candidates searched per anchor, of any key, its own group's or label's included (sentence-transformers'
    # range_max); an anchor none of whose candidates passes the margins goes without a mined negative. null: the
    # range_min + 10 x hard_negatives + 32 nearest of another key, by an exact search that leaves the anchor's own
    # texts out (however many: a label has gathered around its anchors once training ran).
    mine_range_max: int | None = None
    # Refreshes (mine_every) search the vectors the training steps since the last mining computed for the texts
    # they embedded (anchors, positives, negatives; at most one refresh old) and encode only the texts no step
    # embedded: a refresh costs a search, not a pass over the training texts. false: encode them all anew.
    mine_from_steps: bool = False
    # Grouped data with a label column (offers of products, with categories): weight of a supervised
    # contrastive term that keeps items of one label together (what kNN classification needs) next
    # to the matching InfoNCE. 0 = off.
    label_weight: float = 0.0
    label_temperature: float = 0.1  # a temperature, as above

    def __post_init__(self) -> None:
        _check(0.0 < self.temperature <= 1.0, "loss.temperature", f"must be in (0, 1], got {self.temperature}")
        _check(self.hard_negatives >= 0, "loss.hard_negatives", f"must be >= 0, got {self.hard_negatives}")
        _check(self.mine_every is None or self.mine_every == "epoch"
               or (isinstance(self.mine_every, int) and self.mine_every >= 1), "loss.mine_every",
               f"must be null (mine once), a number of steps >= 1, or epoch; got {self.mine_every!r}")
        _check(self.mine_relative_margin is None or 0.0 <= self.mine_relative_margin < 1.0, "loss.mine_relative_margin",
               f"must be in [0, 1) or null (no filter), got {self.mine_relative_margin}; 0.05 drops candidates "
               "above 95% of the positive's score")
        _check(self.mine_absolute_margin is None or 0.0 <= self.mine_absolute_margin < math.inf,
               "loss.mine_absolute_margin", f"must be a finite number >= 0 or null, got {self.mine_absolute_margin}")
        _check(self.mine_range_min >= 0, "loss.mine_range_min", f"must be >= 0, got {self.mine_range_min}")
        least = self.mine_range_min + max(self.hard_negatives, 1)  # room for the negatives past range_min
        _check(self.mine_range_max is None or self.mine_range_max >= least, "loss.mine_range_max",
               f"must be >= loss.mine_range_min + loss.hard_negatives ({least}) or null, got {self.mine_range_max}")
        _check(self.label_weight >= 0.0 and math.isfinite(self.label_weight), "loss.label_weight",
               f"must be >= 0, got {self.label_weight}")
        _check(0.0 < self.label_temperature <= 1.0, "loss.label_temperature",
               f"must be in (0, 1], got {self.label_temperature}")


QUANTIZATIONS = (None, "none", "nf4", "int8")  # train.base_quantization's values


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    # Passes over the training data. auto: 3 for labeled data, 5 for grouped and pairs data (`resolve_epochs`), at
    # lr 1e-3 (LoRA wants about 10x a full fine-tune's rate) with select_best and patience below: labeled proxies
    # peaked at epochs 1-3 of 3; grouped and pairs data kept the last of 3, and 5 raised validation recall@10 on
    # three tasks, both seeds each (+0.003 to +0.018), in 1.5-2.0x the time (docs/benchmarks.md, "train.epochs:
    # auto"). Grouped data gained from 5e-4 -> 1e-3 -> 2e-3 in the PriceRunner runs 2-4.
    epochs: int | str = "auto"
    max_steps: int | None = None  # stop early after this many optimizer steps
    batch_size: int = 64  # anchors per step (each brings a positive)
    lr: float = 1e-3  # peak learning rate (AdamW over the LoRA parameters only)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_ratio: float = 0.1  # share of the steps spent warming the learning rate up
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    scheduler: str = "linear"  # linear|cosine|constant
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 42  # batch order, LoRA initialisation, dropout
    device: str = "auto"  # auto|cpu|cuda
    # auto: groups for labeled data, random for grouped and pairs data (`resolve_batch_sampling`; on grouped
    #   data random pairs were above group batches on validation: docs/benchmarks.md, "Grouped data");
    # random: anchors shuffled, each with a positive drawn from its group/label;
    # by_label: each batch drawn from one label (harder in-batch negatives);
    # groups (grouped/labeled data): batches of whole groups, every text an anchor whose positives
    #   are the other texts of its group in the batch (one forward pass per text, not two);
    # similar_groups: groups, laid in runs of neighbouring groups by the starting encoder, so
    #   in-batch negatives are hard ones at no extra cost
    batch_sampling: str = "auto"
    # groups/similar_groups: a group's texts lie in a batch in pieces of group_size to 2 x group_size - 1
    # (every text once per epoch): with group_size 4, a text has 3+ positives in its batch.
    group_size: int = 4
    mini_batch_size: int | None = None  # cached negatives (GradCache): embed in chunks of this size
    output_dir: str = "runs/{name}"  # the run folder; {name} = the experiment's name
    # A checkpoint every this many steps as well as at each epoch's end, so --resume loses at
    # most that many steps of a long epoch (null: at epoch ends only).
    checkpoint_every: int | None = 500
    log_every: int = 10  # log train loss, lr and samples/s every this many steps
    eval_every_epoch: bool = True  # validation after each epoch (the metric below and the loss)
    # Model selection without the eval split: a validation split carved out of the training data
    # (`data.examples.carve_validation`: labeled data by text, every label keeping its share; grouped
    # by group; pairs by query), scored each epoch on the task's own metric: kNN macro-F1 against
    # the training texts for labeled data, recall@10 for grouped and pairs data. 0: no validation
    # (then set select_best=false and patience=null too).
    val_fraction: float = 0.1
    select_best: bool = True  # end with the best epoch's adapter (saved, and evaluated), not the last one's
    # The validation metric select_best and patience follow (higher is better). auto: macro_f1 for labeled data,
    # recall@10 for grouped and pairs data. Labeled: macro_f1 or accuracy (kNN); grouped and pairs: recall@10,
    # r_cap@10, mrr@10 or ndcg@10 (the top of the ranking, for a search whose first hits matter most). Every one of
    # them is logged each epoch whichever is chosen.
    select_metric: str = "auto"
    patience: int | None = 2  # stop after this many epochs without a better validation metric; null: never
    # Per-epoch validation encodes at most this many validation texts/queries. Grouped data without a query
    # instruction scores every query, as its queries are corpus texts whose vectors it has.
    val_max_queries: int = 1000
    val_max_index: int = 10000  # labeled data: the kNN index holds at most this many training texts
    # Grouped and pairs data: at most this many documents of the training split (drawn by the seed) join the
    # validation corpus. Its own documents alone are a tenth of the data's, where recall@10 sits near 1 and ranks
    # settings unlike the full corpus of the evaluation does (docs/benchmarks.md, "Pairs data"). 0: its own only.
    val_distractors: int = 10000
    threads: int | None = None  # torch CPU threads; null = torch's default
    # Frozen base weights (LoRA weights and optimizer state stay fp32): auto = bf16 on CUDA and on
    # CPUs with native bf16 (AVX512-BF16, AMX), fp32 on other CPUs.
    base_dtype: str = "auto"
    # QLoRA: load the frozen base through bitsandbytes, its linear layers quantised to 4-bit NF4
    # (double-quantised, bf16 compute) or 8-bit LLM.int8, and train fp32 LoRA weights on them. Needs a
    # CUDA GPU and bitsandbytes; the rest of the base stays bf16 (so base_dtype auto or bf16). For
    # training only: the base evaluation, the final evaluation and the export use the unquantised base.
    # null (or none): unquantised.
    base_quantization: str | None = None
    # torch.compile each transformer layer before training (fuses the element-wise work around the
    # matmuls). On 2 CPU cores: a 10-25 s compile, then 5% faster steps and 40% less peak memory
    # (docs/benchmarks.md); on GPU measured by benchmarks/gpu_check.py.
    compile: bool = False
    # Dropout inside the frozen base model while training (its config's hidden and attention
    # dropout, as sentence-transformers trains). false: only the LoRA layers drop out (lora.dropout).
    # On 2 CPU cores, MiniLM on PriceRunner: 1.16-1.24x faster steps, the same recall@10, but a
    # full run lost 0.011 recall@1 (docs/benchmarks.md), hence on by default. No effect on Qwen3 (no dropout).
    base_dropout: bool = True

    def __post_init__(self) -> None:
        _check(self.epochs == "auto" or (isinstance(self.epochs, int) and self.epochs >= 1), "train.epochs",
               f"must be a number >= 1 or auto (by the data's shape), got {self.epochs!r}")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", f"must be >= 1, got {self.max_steps}")
        _check(self.batch_size >= 2, "train.batch_size", f"must be >= 2 (in-batch negatives), got {self.batch_size}")
        _check(self.lr > 0 and math.isfinite(self.lr), "train.lr", f"learning rate must be > 0, got {self.lr}")
        _check(0 <= self.weight_decay < math.inf, "train.weight_decay",
               f"must be a finite number >= 0, got {self.weight_decay}")
        _check(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "train.warmup_steps",
               f"must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps is not None and self.max_steps is not None:
            _check(self.warmup_steps <= self.max_steps, "train.warmup_steps",
                   f"warmup ({self.warmup_steps}) is longer than training (max_steps={self.max_steps}); lower it")
        _check(self.scheduler in ("linear", "cosine", "constant"), "train.scheduler",
               f"unknown scheduler {self.scheduler!r}; use linear, cosine or constant")
        _check(self.max_grad_norm > 0, "train.max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        _check(is_device(self.device), "train.device", f"unknown device {self.device!r}; use {DEVICES}")
        _check(self.batch_sampling in ("auto", "random", "by_label", "groups", "similar_groups"), "train.batch_sampling",
               f"unknown batch_sampling {self.batch_sampling!r}; use auto, random, by_label, groups or similar_groups")
        _check(self.group_size >= 2, "train.group_size", f"must be >= 2 (a text and its positive), got {self.group_size}")
        if self.mini_batch_size is not None:
            _check(1 <= self.mini_batch_size, "train.mini_batch_size", f"must be >= 1, got {self.mini_batch_size}")
        _check(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        _check(self.checkpoint_every is None or self.checkpoint_every >= 1, "train.checkpoint_every",
               f"must be >= 1 or null (at epoch ends only), got {self.checkpoint_every}")
        _check(self.threads is None or self.threads >= 1, "train.threads",
               f"must be >= 1 or null (torch's default), got {self.threads}")
        _check(self.base_dtype in ("auto", "fp32", "bf16"), "train.base_dtype",
               f"unknown base_dtype {self.base_dtype!r}; use auto, fp32 or bf16")
        _check(self.base_quantization in QUANTIZATIONS, "train.base_quantization",
               f"unknown base_quantization {self.base_quantization!r}; use nf4, int8 or null (unquantised)")
        if self.quantization is not None:
            _check(self.base_dtype != "fp32", "train.base_dtype",
                   f"fp32 does not go with train.base_quantization={self.quantization}: the quantised layers "
                   "compute in bf16 and the base's other weights are loaded in bf16; set -o train.base_dtype=auto, "
                   "or -o train.base_quantization=null for an fp32 base")
        _check(self.val_max_queries >= 1, "train.val_max_queries", f"must be >= 1, got {self.val_max_queries}")
        _check(0 <= self.seed < 2**32, "train.seed", f"must be in [0, 2**32) (numpy's seeds), got {self.seed}")
        _check(self.val_distractors >= 0, "train.val_distractors", f"must be >= 0, got {self.val_distractors}")
        _check(self.val_max_index >= 1, "train.val_max_index", f"must be >= 1, got {self.val_max_index}")
        _check(0.0 <= self.val_fraction < 1.0, "train.val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        _check(self.patience is None or self.patience >= 1, "train.patience",
               f"must be >= 1 or null (never stop early), got {self.patience}")
        _check(self.select_metric in ("auto", *LABELED_SELECT_METRICS, *RETRIEVAL_SELECT_METRICS),
               "train.select_metric", f"unknown metric {self.select_metric!r}; use auto, "
               f"{', '.join(LABELED_SELECT_METRICS)} (labeled data) or {', '.join(RETRIEVAL_SELECT_METRICS)} "
               "(grouped and pairs data)")
        if self.val_fraction == 0:
            # Without a validation split there is nothing to select or stop on: say so rather than ignore them.
            _check(not self.select_best, "train.select_best", "needs a validation split, and train.val_fraction=0 "
                   "has none; set -o train.val_fraction=0.1, or -o train.select_best=false to keep the last epoch")
            _check(self.patience is None, "train.patience", "needs a validation split, and train.val_fraction=0 "
                   "has none; set -o train.val_fraction=0.1, or -o train.patience=null to train every epoch")

    @property
    def quantization(self) -> str | None:
        """base_quantization with `none` read as null: nf4, int8 or None."""
        return None if self.base_quantization in (None, "none") else self.base_quantization


PRECISIONS = ("auto", "fp32", "bf16")  # eval.precision's values
TASKS = ("retrieval", "classification")  # eval.tasks' values: the evaluators of embedft.evaluation.tasks


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation with FAISS: retrieval and kNN classification, base vs adapted."""

    tasks: tuple[str, ...] = ("retrieval", "classification")  # those the data supports are run
    ks: tuple[int, ...] = (1, 5, 10, 100)  # recall@k and r_cap@k for each k (MRR and nDCG are @10)
    knn_k: int = 10  # neighbours that vote in kNN classification (index = the train split)
    knn_weighted: bool = True  # weight each vote by its similarity
    indexes: tuple[str, ...] = ()  # FAISS factory strings next to exact search, e.g. HNSW32, IVF256,Flat
    linear_probe: bool = False  # also a logistic-regression probe (--linear-probe)
    batch_size: int = 256  # encoding: a forward call holds at most this many rows of the longest text in padded tokens
    # Encoding precision: auto = bf16 autocast on CUDA, fp32 on CPU; fp32 everywhere; or bf16 =
    # a bf16 copy of the weights (about 2x faster on a CPU with native bf16, docs/benchmarks.md).
    precision: str = "auto"
    compare_base: bool = True  # also evaluate the untuned base model, side by side (false: as `eval --no-base`)
    # `embedft eval`'s report folder when --out is not given ({name} = the experiment's name); null: in the
    # run folder, eval/ for its own adapter, else beside it (eval-base, eval-run-<id>, eval-<folder>).
    # `embedft train` always writes its report to the run folder's eval/ (what export's model card reads).
    output_dir: str | None = None

    def __post_init__(self) -> None:
        for t in self.tasks:
            _check(t in TASKS, "eval.tasks", f"unknown task {t!r}; use {', '.join(TASKS)}")
        _check(len(self.ks) > 0 and all(k >= 1 for k in self.ks), "eval.ks", f"must be positive integers, got {self.ks}")
        _check(self.knn_k >= 1, "eval.knn_k", f"must be >= 1, got {self.knn_k}")
        _check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.precision in PRECISIONS, "eval.precision",
               f"unknown precision {self.precision!r}; use auto, fp32 or bf16")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking. Default store: SQLite file in the working directory."""

    enabled: bool = True  # false: no MLflow run
    uri: str | None = None  # null = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str | None = None  # null = the experiment's name
    run_name: str | None = None  # the MLflow run's name; null = the experiment's name

    def __post_init__(self) -> None:
        if self.uri is not None:
            problem = tracking_uri_problem(self.uri)
            _check(problem is None, "tracking.uri", f"{self.uri!r}: {problem}")


@dataclass(frozen=True)
class ExportConfig:
    """Merged export of the trained encoder."""

    n_probe: int = 64  # probe texts saved with the export for parity checks
    min_cosine: float = 0.99999  # fp32 parity tolerances; bf16/fp16 exports use looser ones
    max_abs_diff: float = 1e-5  # fp32 parity: largest allowed coordinate difference

    def __post_init__(self) -> None:
        _check(self.n_probe >= 1, "export.n_probe", f"must be >= 1, got {self.n_probe}")
        _check(0.0 < self.min_cosine <= 1.0, "export.min_cosine",
               f"a cosine similarity, must be in (0, 1], got {self.min_cosine}")
        _check(0.0 <= self.max_abs_diff < math.inf, "export.max_abs_diff",
               f"must be a finite number >= 0, got {self.max_abs_diff}")


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: every stage's section."""

    name: str = "default"  # the experiment: names the run folder and, by default, the MLflow experiment
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        # The run folder is runs/{name}: "." or ".." would put it in runs/ itself or in the working directory.
        _check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name",
               f"must be a non-empty name without '/' (not . or ..), got {self.name!r}")
        _check_folder_template(self.train.output_dir, self.name, "train.output_dir", "runs")
        if self.eval.output_dir is not None:
            _check_folder_template(self.eval.output_dir, self.name, "eval.output_dir", "reports")
            _check(bool(self.eval.output_dir.strip()), "eval.output_dir",
                   "must be a folder path or null (the run folder's eval/), got an empty string")
        sampling = resolve_batch_sampling(self.train.batch_sampling, self.data.shape)
        auto = f" (train.batch_sampling=auto means {sampling} for {self.data.shape} data)" \
            if self.train.batch_sampling == "auto" else ""
        if sampling == "by_label" and self.data.shape == "labeled" and self.loss.hard_negatives == 0:
            # Labeled data's positives are its labels: in a one-label batch every other text is the
            # anchor's positive, none is a negative, and the contrastive loss is 0 at every step.
            raise ConfigError("train.batch_sampling=by_label on labeled data (data.shape=labeled) puts one label in "
                              "each batch, so no in-batch text is a negative and the loss is 0 (nothing is "
                              "learned); use -o train.batch_sampling=groups (several texts of each of many labels "
                              "per batch), or add mined negatives from other labels with -o loss.hard_negatives=1",
                              ("train.batch_sampling", "loss.hard_negatives"))
        labeled = self.data.shape == "labeled"
        allowed = LABELED_SELECT_METRICS if labeled else RETRIEVAL_SELECT_METRICS
        _check(self.train.select_metric in ("auto", *allowed), "train.select_metric",
               f"{self.train.select_metric} is not measured on {self.data.shape} data's validation (kNN "
               f"classification for labeled data, retrieval for grouped and pairs data); use auto or one of "
               f"{', '.join(allowed)}")
        if self.loss.mine_every is not None and self.loss.hard_negatives == 0 and sampling != "similar_groups":
            raise ConfigError(f"loss.mine_every={self.loss.mine_every!r} has nothing to mine: loss.hard_negatives is 0 "
                              f"and train.batch_sampling={sampling} finds no neighbouring groups; set "
                              "-o loss.hard_negatives=N (N >= 1), or remove loss.mine_every",
                              ("loss.mine_every", "loss.hard_negatives"))
        if self.loss.mine_from_steps and (self.loss.mine_every is None or self.loss.hard_negatives == 0):
            raise ConfigError("loss.mine_from_steps=true reuses the training steps' vectors when mined negatives are "
                              f"refreshed, but loss.hard_negatives={self.loss.hard_negatives} and loss.mine_every="
                              f"{self.loss.mine_every!r} refresh none; set -o loss.hard_negatives=1 -o "
                              "loss.mine_every=epoch, or remove loss.mine_from_steps",
                              ("loss.mine_from_steps", "loss.mine_every", "loss.hard_negatives"))
        if sampling in GROUP_SAMPLINGS and self.loss.symmetric:
            raise ConfigError(f"loss.symmetric=true is not used with train.batch_sampling={sampling}{auto} "
                              "(every text of a group batch is already an anchor against all the others, so there "
                              "is no positive->anchor direction to add); set -o loss.symmetric=false, or "
                              "-o train.batch_sampling=random",
                              ("loss.symmetric", "train.batch_sampling"))

    @property
    def output_dir(self) -> Path:
        """The run folder, with {name} filled in."""
        return Path(self.train.output_dir.format(name=self.name))

    @property
    def eval_output_dir(self) -> Path | None:
        """`embedft eval`'s report folder (eval.output_dir with {name} filled in), or None: chosen per model."""
        return None if self.eval.output_dir is None else Path(self.eval.output_dir.format(name=self.name))


# What a union's error names for each of its types (a dataclass: a mapping).
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", tuple: "a list"}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce a YAML value into the annotated type; reject what does not fit."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}", (where,))
        return _build(tp, value, where)
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: may not be null", (where,))
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        kinds = " or ".join(_KINDS.get(get_origin(a) or a, "a mapping") for a in args if a is not type(None))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {kinds}, got {value!r}", (where,))
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}", (where,))
        (inner, *_rest) = get_args(tp)
        return tuple(_coerce(v, inner, where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}", (where,))
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}", (where,))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}", (where,))
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}", (where,))
        return value
    return value


# Names other tools use for our keys; difflib cannot see that learning_rate means lr.
_SYNONYMS = {"learning_rate": "lr", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
             "num_epochs": "epochs", "num_train_epochs": "epochs", "warmup": "warmup_steps", "temp": "temperature"}


def _build(cls: type, values: dict, where: str = "") -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        k = unknown[0]
        close = [_SYNONYMS[k]] if _SYNONYMS.get(k) in names else difflib.get_close_matches(str(k), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        key = f"{where + '.' if where else ''}{k}"
        raise ConfigError(f"{key}: unknown key{hint}; valid keys: {', '.join(names)}", (key,))
    kwargs = {k: _coerce(v, hints[k], f"{where + '.' if where else ''}{k}") for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(values: dict) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from a nested dict."""
    return _build(ExperimentConfig, values or {})


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. -o train.lr=1e-4")
    key, raw = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(k.strip() for k in keys):
        raise ConfigError(f"override {item!r}: empty key name before '='; expected section.key=value, "
                          "e.g. -o train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({first}); quote it or close its "
                          "brackets, e.g. -o 'eval.ks=[1,5,10]'") from None
    # YAML reads 1e-4 as a string; numbers in scientific notation are common in lr overrides.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else int(value)
        except ValueError:
            pass
    return [k.strip() for k in keys], value


def apply_overrides(values: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Return a copy of the nested dict with `a.b=value` overrides applied."""
    import copy

    out = copy.deepcopy(values or {})
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice in one section (lines {seen[key]} and "
                                  f"{key_node.start_mark.line + 1}); the second would silently replace the first: "
                                  "merge them into one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    """Read an experiment YAML into a dict, with a clear error for a missing or bad file."""
    p = Path(path)
    if not p.is_file():
        what = "is a folder, not a config file" if p.is_dir() else "config file not found"
        raise ConfigError(f"{p}: {what}; pass an experiment YAML such as experiments/default.yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                          "save it as UTF-8") from None
    try:
        values = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections (data, model, lora, ...)")
    return values


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load an experiment YAML (or the defaults when path is None) and apply overrides."""
    values = read_yaml(path) if path is not None else {}
    values = apply_overrides(values, overrides)
    try:
        cfg = config_from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{_error_source(path, overrides, e.keys)}: {e}", e.keys) from None
    # Relative data paths in a YAML are relative to the working directory (the repo root),
    # which is where the Makefile and README run commands.
    return cfg


def _error_source(path: str | Path | None, overrides: list[str] | tuple[str, ...], keys: tuple[str, ...]) -> str:
    """What a config error is about: the file, and the -o options that set the keys it names, if any did."""
    last: dict[str, str] = {}  # key -> the last option that set it (the one in force)
    for option in overrides:
        k = ".".join(parse_override(option)[0])
        if any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for key in keys):
            last[k] = option
    where = str(path or "config")
    return f"{where} ({', '.join('-o ' + o for o in last.values())})" if last else where


def to_dict(cfg: Any) -> dict:
    """Nested plain dict (tuples as lists) for YAML/JSON/MLflow."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (loadable again with load_config)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
