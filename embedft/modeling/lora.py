"""LoRA on the encoder: attach adapters to the family's Q/K/V (or every linear layer of its blocks),
save and load them with their spec.

The adapter folder is peft's (adapter_config.json, adapter_model.safetensors) plus
embedft_meta.json: the EncoderSpec that trained it, checked against the base model on load.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from embedft.atomic import write_text, writing_into
from embedft.config import LoraConfig
from embedft.errors import ModelError
from embedft.modeling.encoder import Encoder
from embedft.modeling.families import MODEL_TYPES, linear_module_names

META_FILE = "embedft_meta.json"


def lora_targets(encoder: Encoder, lora: LoraConfig) -> tuple[str, ...]:
    """The configured target_modules, else the family's Q/K/V (`lora.targets: qkv`), plus with
    `lora.targets: all` the other linear layers of every block (attention output, feed-forward)."""
    if lora.target_modules:
        return tuple(lora.target_modules)
    fam = MODEL_TYPES.get(encoder.spec.model_type)
    if fam is None:
        raise ModelError(f"no default LoRA targets for {encoder.spec.model_type!r}; set lora.target_modules")
    if lora.targets == "qkv":
        return fam.targets
    if not fam.block_linear:
        raise ModelError(f"lora.targets=all: the block layers of {encoder.spec.model_type!r} are not known to embedft; "
                         f"list them in lora.target_modules (its linear layers: "
                         f"{', '.join(linear_module_names(encoder.backbone))})")
    return fam.targets + fam.block_linear


def apply_lora(encoder: Encoder, lora: LoraConfig) -> Encoder:
    """Wrap the backbone with LoRA adapters (only they are trainable)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora_targets(encoder, lora)
    names = [n for n, m in encoder.backbone.named_modules() if isinstance(m, nn.Linear)]
    # peft's rule: a target is a module's full name or a suffix of it after a dot.
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ModelError(f"LoRA targets {missing} are not linear layers of {encoder.spec.base_model}; its linear "
                         f"layers are: {', '.join(linear_module_names(encoder.backbone))}. Set lora.target_modules")
    pcfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(targets), bias="none")
    with peft_quiet():
        peft_model = get_peft_model(encoder.backbone, pcfg)
    encoder.backbone = peft_model
    return encoder


@contextlib.contextmanager
def peft_quiet():
    # peft reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning on every
    # train, eval and export that the user can do nothing about.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        yield


def lora_settings(encoder: Encoder, lora: LoraConfig | None = None) -> dict[str, Any] | None:
    """r, alpha, dropout and targets of the encoder's adapter, or those `lora` would give it
    (the same values either way; None for an encoder without LoRA and no config)."""
    if lora is not None:
        return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
                "target_modules": sorted(lora_targets(encoder, lora))}
    peft_cfg = getattr(encoder.backbone, "peft_config", {}).get("default")
    if peft_cfg is None:
        return None
    return {"r": peft_cfg.r, "alpha": peft_cfg.lora_alpha, "dropout": peft_cfg.lora_dropout,
            "target_modules": sorted(peft_cfg.target_modules)}


def save_adapter(encoder: Encoder, out_dir: str | Path, extra_meta: dict[str, Any] | None = None) -> Path:
    """Adapter weights (safetensors) + adapter config + the EncoderSpec that produced them."""
    out = Path(out_dir)
    meta = {"spec": encoder.spec.to_json(), **(extra_meta or {})}
    with writing_into(out, out, "write elsewhere"):  # peft's and safetensors' disk errors too, as WriteError
        out.mkdir(parents=True, exist_ok=True)
        encoder.backbone.save_pretrained(str(out), safe_serialization=True)
        write_text(out / META_FILE, json.dumps(meta, indent=2))
    return out


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    """The embedft metadata saved with an adapter, with clear errors for missing files."""
    d = Path(adapter_dir)
    if not d.is_dir():
        what = "is a file, not a folder" if d.exists() else "does not exist"
        raise ModelError(f"adapter folder {d} {what}; pass the adapter/ folder of a run (runs/<name>/adapter)")
    for f in ("adapter_config.json", "adapter_model.safetensors", META_FILE):
        if not (d / f).is_file():
            raise ModelError(f"{d}: missing {f}; this is not a complete embedft adapter folder "
                             f"(expected adapter_config.json, adapter_model.safetensors and {META_FILE})")
    _adapter_json(d / "adapter_config.json")  # peft and the export read it; a damaged one fails here, clearly
    return _adapter_json(d / META_FILE)


def _adapter_json(path: Path) -> dict:
    # A damaged adapter file is named with the fix, not left to a JSONDecodeError traceback.
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ModelError(f"{path} is not valid JSON ({e}); the adapter folder is damaged: copy it again or "
                         "re-train it") from e
    if not isinstance(value, dict):
        raise ModelError(f"{path} holds a JSON {type(value).__name__}, not an object; the adapter folder is damaged: "
                         "copy it again or re-train it")
    return value


def check_adapter_base(encoder: Encoder, adapter_dir: str | Path) -> None:
    """A clear error unless the adapter was trained on this base model (its weights' fingerprint)."""
    spec = read_adapter_meta(adapter_dir).get("spec", {})
    if spec.get("fingerprint") and spec["fingerprint"] != encoder.spec.fingerprint:
        raise ModelError(f"adapter {adapter_dir} was trained on base model {spec.get('base_model')!r} "
                         f"(fingerprint {spec['fingerprint']}, {spec.get('model_type')}, hidden {spec.get('hidden_size')}) "
                         f"but the model given is {encoder.spec.base_model!r} (fingerprint {encoder.spec.fingerprint}, "
                         f"{encoder.spec.model_type}, hidden {encoder.spec.hidden_size}); pass the adapter's base model")


def load_adapter(encoder: Encoder, adapter_dir: str | Path) -> Encoder:
    """Attach a saved adapter to a freshly loaded base Encoder, checking it was trained on this base."""
    from peft import PeftModel

    check_adapter_base(encoder, adapter_dir)
    try:
        with peft_quiet():
            encoder.backbone = PeftModel.from_pretrained(encoder.backbone, str(adapter_dir), is_trainable=False)
    except Exception as e:  # corrupted safetensors, shape mismatch
        raise ModelError(f"could not load adapter {adapter_dir}: {e}") from e
    return encoder
