"""Export: merge a LoRA adapter into its base and save a plain sentence-transformers model.

The export loads with ``SentenceTransformer(path)`` alone (no embedft, no peft) and embeds
text exactly as the adapter model did: same pooling, normalisation, padding side, EOS
handling and query prompt. That is checked, not assumed (`embedft.export.parity`): probe
texts are embedded by the adapter model before merging and by a fresh plain load of the
saved folder, and the export is only moved into place when the two agree.

Layout of an export folder (besides the sentence-transformers files)::

    probes.json            the probe texts
    probe_embeddings.npy   float32 (2, N, D): [0] documents, [1] queries (prompt_name="query")
    embedft_export.json    spec, adapter metadata, dtype, tolerances, parity figures
    README.md              model card
    onnx/model.onnx        with --onnx: the whole embedding as one fp32 graph (embedft.export.onnx)
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from embedft.atomic import building, out_dir_problem, place_new_dir, replace_dir, write_bytes, write_text
from embedft.config import ExportConfig, LoraConfig, ModelConfig, config_from_dict
from embedft.errors import ConfigError, ExportError
from embedft.export.card import lora_summary, model_card
from embedft.export.fingerprint import weights_digest
from embedft.export.parity import (
    EXPORT_META,
    PROBE_EMB_FILE,
    PROBES_FILE,
    _looser,
    _probe_list,
    _tolerances,
    parity_summary,
)
from embedft.export.verify import _parity

log = logging.getLogger(__name__)

DTYPES = ("fp32", "bf16", "fp16")
OUT_ELSEWHERE = "pass another --out"


def export_merged(adapter_dir: str | Path, out_dir: str | Path, model_name: str | None = None, dtype: str = "fp32",
                  overwrite: bool = False, probe_texts: list[str] | None = None, cfg: ExportConfig | None = None,
                  onnx: bool = False, device: str = "cpu", source: str | None = None) -> dict:
    """Merge the adapter into its base, save a plain sentence-transformers folder, check parity; returns the report.

    `cfg` None: the `export:` section of the experiment the adapter was trained with (its embedft_meta.json).
    `source`: where the adapter came from, recorded instead of `adapter_dir` (e.g. runs:/<id>/adapter
    for a temporary download).
    """
    import torch

    from embedft.modeling.lora import load_adapter, read_adapter_meta

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    # Everything that can be checked without a model is checked first.
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    _check_out_dir(out, overwrite)
    if onnx:
        from embedft.export.onnx import require_onnx

        require_onnx()
    meta = read_adapter_meta(adapter_dir)
    spec = meta.get("spec") or {}
    if not spec:
        raise ExportError(f"{adapter_dir}: embedft_meta.json has no 'spec'; re-save the adapter with embedft")
    query_prompt = _query_prompt(spec.get("query_template"))
    cfg = cfg or _run_export_config(meta, adapter_dir)
    _check_safetensors(adapter_dir / "adapter_model.safetensors")
    lora_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    probes = _probe_list(probe_texts, cfg.n_probe)

    encoder = _load_base(spec, model_name, meta, lora_cfg, device)
    load_adapter(encoder, adapter_dir)  # checks the base fingerprint
    encoder.eval()

    # Reference: the adapter model in fp32, documents plain and queries with the template.
    ref = np.stack([_encode(encoder, probes, False, device), _encode(encoder, probes, True, device)])  # (2, N, D)
    with encoder.backbone.disable_adapter():
        base = np.stack([_encode(encoder, probes, False, device), _encode(encoder, probes, True, device)])
    delta_w = _max_lora_delta(encoder.backbone)
    effect = float(np.abs(ref - base).max())
    if delta_w == 0.0 or effect < 1e-7:
        raise ExportError(
            f"the adapter has no effect: merged into {encoder.spec.base_model!r} it leaves the base model unchanged "
            f"(max |delta W| over LoRA layers = {delta_w:.3g}, max embedding change on {len(probes)} probes = "
            f"{effect:.3g}). lora_B starts at zero, so an untrained or zeroed adapter is a no-op; train it "
            f"(embedft train) or check {adapter_dir} is the adapter you meant")

    try:
        merged = encoder.backbone.merge_and_unload(safe_merge=True)
    except ValueError as e:  # safe_merge found NaNs
        raise ExportError(f"merging {adapter_dir} into {encoder.spec.base_model!r} failed: {e}") from e
    encoder.st[0].model = merged
    encoder.backbone = merged
    merged_ref = np.stack([_encode(encoder, probes, False, device), _encode(encoder, probes, True, device)])
    merge_diff = float(np.abs(merged_ref - ref).max())

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    tol = _tolerances(dtype, cfg)
    merged.to(torch_dtype)
    st = to_sentence_transformer(encoder, query_prompt, device)

    # A disk that refuses a write (ours or a library's) is one WriteError naming the file; `out` stays as it was.
    kept = f"the earlier export at {out} is kept" if out.is_dir() and any(out.iterdir()) else \
        f"nothing was written to {out}"
    with building(out, OUT_ELSEWHERE, kept) as tmp:
        st.save(str(tmp))
        write_text(tmp / PROBES_FILE, json.dumps(probes, indent=1, ensure_ascii=False))
        write_bytes(tmp / PROBE_EMB_FILE, _npy(ref.astype(np.float32)))
        parity = _parity(tmp, probes, ref, tol, device)
        if not parity["ok"]:
            raise ExportError(f"parity check failed for the {dtype} export of {adapter_dir}: "
                              f"{parity_summary(parity)}; the export was not written")
        report: dict[str, Any] = {
            "out_dir": str(out), "dtype": dtype, "tolerances": tol, "parity": parity,
            "merge_max_abs_diff": merge_diff, "adapter_max_delta_weight": delta_w,
            "adapter_vs_base_max_abs_diff": effect, "n_probes": len(probes),
            "spec": encoder.spec.to_json(), "query_prompt": query_prompt,
            "weights_digest": weights_digest(tmp),
        }
        if onnx:
            from embedft.export.onnx import ONNX_TOLERANCES, export_onnx

            report["onnx"] = export_onnx(tmp, probes, ref, encoder.spec, _looser(tol, ONNX_TOLERANCES))
        write_text(tmp / EXPORT_META, json.dumps({
            **{k: v for k, v in report.items() if k != "out_dir"},
            "adapter": {"dir": source or str(adapter_dir), "meta": meta, "lora": lora_summary(lora_cfg)},
            "probe_embeddings": "float32 (2, N, D): [0] documents, [1] queries (prompt_name='query')",
            "versions": _versions(),
        }, indent=2, default=str))
        write_text(tmp / "README.md", model_card(out.name, encoder.spec.to_json(), meta, lora_cfg, adapter_dir,
                                                 query_prompt, report))
        _move_into_place(tmp, out, overwrite)
    log.info("exported %s -> %s (%s): %s", adapter_dir, out, dtype, parity_summary(parity))
    return report


def _check_out_dir(out: Path, overwrite: bool) -> None:
    problem = out_dir_problem(out, overwrite)
    if problem:
        raise ExportError(f"export folder: {problem}")


def _query_prompt(template: str | None) -> str:
    """The sentence-transformers prompt for queries: the template's text before {text}."""
    if not template:
        return ""
    if template.count("{text}") != 1 or not template.endswith("{text}"):
        raise ExportError(f"query template {template!r} is not a prefix ('...{{text}}'); sentence-transformers "
                          f"prompts can only prepend text, so this adapter cannot be exported as a plain model")
    return template[: -len("{text}")]


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # the Rust error type is not importable by a stable name
        raise ExportError(f"{path} is corrupted or truncated ({e}); copy the adapter again or re-train it") from e


def _load_base(spec: dict, model_name: str | None, meta: dict, lora_cfg: dict, device: str):
    """The adapter's base model as an Encoder whose behaviour (pooling, prompts, ...) is the adapter's spec."""
    from embedft.errors import ModelError
    from embedft.modeling.encoder import load_encoder

    name = model_name or spec.get("base_model")
    if not name:
        raise ExportError("the adapter's metadata names no base model; pass --model")
    trust = bool(((meta.get("config") or {}).get("model") or {}).get("trust_remote_code", False))
    targets = lora_cfg.get("target_modules")
    mcfg = ModelConfig(name=name, family=spec.get("family", "auto"), pooling=spec.get("pooling", "auto"),
                       max_length=int(spec.get("max_length", 128)), normalize=bool(spec.get("normalize", True)),
                       query_instruction=spec.get("query_template"), trust_remote_code=trust)
    lora = LoraConfig(target_modules=tuple(targets)) if isinstance(targets, (list, tuple)) and targets else None
    try:
        encoder = load_encoder(mcfg, device, lora)
    except ModelError as e:
        raise ModelError(f"{e} (loading the adapter's base model {name!r}; pass --model to use another copy of it)") from e
    encoder.float()  # merge and reference embeddings in fp32, whatever dtype the base was stored in
    keep = {k: spec[k] for k in ("pooling", "normalize", "padding_side", "query_template", "max_length") if k in spec}
    encoder.spec = replace(encoder.spec, **keep)
    encoder.tokenizer.padding_side = encoder.spec.padding_side
    return encoder


def _encode(encoder, texts: Sequence[str], is_query: bool, device: str, batch_size: int = 32) -> np.ndarray:
    """fp32 embeddings without autocast (Encoder.encode uses bf16 autocast on CUDA)."""
    import torch

    ids = encoder.tokenize(texts, is_query)
    out = []
    with torch.inference_mode():
        for i in range(0, len(ids), batch_size):
            out.append(encoder(**encoder.collate(ids[i:i + batch_size], device)).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def _max_lora_delta(peft_model) -> float:
    """Largest |B A * scale| entry over the active LoRA layers (0.0 when B is all zero)."""
    import torch
    from peft.tuners.lora import LoraLayer

    worst = 0.0
    with torch.no_grad():
        for m in peft_model.modules():
            if isinstance(m, LoraLayer):
                for name in m.active_adapters:
                    if name in m.lora_A:
                        worst = max(worst, float(m.get_delta_weight(name).abs().max()))
    return worst


def _run_export_config(meta: dict, adapter_dir: Path) -> ExportConfig:
    # An adapter saved before embedft recorded its config (or a hand-made one) exports with the defaults.
    values = (meta.get("config") or {}).get("export") or {}
    try:
        return config_from_dict({"export": values}).export
    except ConfigError as e:
        raise ExportError(f"{adapter_dir / 'embedft_meta.json'}: the run's export settings are invalid: {e}") from e


def _st_classes():
    try:  # sentence-transformers >= 6
        from sentence_transformers.base.modules import Normalize
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # 3.x - 5.x
        from sentence_transformers.models import Normalize, Pooling
    return Pooling, Normalize


def to_sentence_transformer(encoder, query_prompt: str = "", device: str = "cpu"):
    """A SentenceTransformer of the merged Transformer module, the spec's pooling and normalisation."""
    from sentence_transformers import SentenceTransformer

    Pooling, Normalize = _st_classes()
    spec = encoder.spec
    transformer = encoder.st[0]
    transformer.max_seq_length = spec.max_length
    modules = [transformer, Pooling(spec.hidden_size, pooling_mode=spec.pooling)]
    if spec.normalize:
        modules.append(Normalize())
    # No default prompt: documents are encoded plain, queries with prompt_name="query".
    return SentenceTransformer(modules=modules, prompts={"query": query_prompt, "document": ""},
                               default_prompt_name=None, device=device)


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if overwrite:
        replace_dir(tmp, out)
        return
    try:
        place_new_dir(tmp, out)
    except FileExistsError as e:  # _check_out_dir passed, but another export wrote `out` while this one ran
        raise ExportError(f"export folder {out} appeared while this export ran (another export to the same --out?); "
                          f"it was left as it is: pass --overwrite to replace it") from e


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()  # serialised in memory, written whole by atomic.write_bytes
    np.save(buf, a)
    return buf.getvalue()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("embedft", "sentence-transformers", "transformers", "peft", "torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
