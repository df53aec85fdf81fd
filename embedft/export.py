"""Export: merge a LoRA adapter into its base and save a plain sentence-transformers model.

The export loads with ``SentenceTransformer(path)`` alone (no embedft, no peft) and embeds
text exactly as the adapter model did: same pooling, normalisation, padding side, EOS
handling and query prompt. That is checked, not assumed: probe texts are embedded by the
adapter model before merging and by a fresh plain load of the saved folder, and the export
is only moved into place when the two agree. The probes and their reference vectors ship
with the export so ``embedft verify`` can repeat the check on any machine later.

Layout of an export folder (besides the sentence-transformers files)::

    probes.json            the probe texts
    probe_embeddings.npy   float32 (2, N, D): [0] documents, [1] queries (prompt_name="query")
    embedft_export.json    spec, adapter metadata, dtype, tolerances, parity figures
    README.md              model card
    onnx/model.onnx        with --onnx: the whole embedding as one fp32 graph (embedft.export_onnx)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from embedft.atomic import out_dir_problem, place_new_dir, replace_dir, temp_sibling
from embedft.card import lora_summary, model_card
from embedft.config import ConfigError, ExportConfig, LoraConfig, ModelConfig, config_from_dict

log = logging.getLogger(__name__)

EXPORT_META = "embedft_export.json"
PROBES_FILE = "probes.json"
PROBE_EMB_FILE = "probe_embeddings.npy"
DTYPES = ("fp32", "bf16", "fp16")
# Reduced-precision weights cannot match fp32 to 1e-5; these are what a correct bf16/fp16
# export reaches on real models (bf16 keeps 8 mantissa bits, fp16 11).
REDUCED_TOLERANCES = {"bf16": {"min_cosine": 0.99, "max_abs_diff": 2e-2},
                      "fp16": {"min_cosine": 0.999, "max_abs_diff": 5e-3}}

# Varied short texts (products, questions, support, numbers, punctuation, other scripts,
# one longer than any max_length) so parity covers truncation and odd tokens.
DEFAULT_PROBES: tuple[str, ...] = (
    "apple iphone 8 plus 64gb silver",
    "samsung galaxy s21 ultra 5g 256gb phantom black",
    "sony bravia 55 inch 4k uhd smart led tv",
    "lg oled65c1 65\" oled tv",
    "bosch serie 6 washing machine 9kg 1400 rpm white",
    "hotpoint fridge freezer 70/30 frost free silver",
    "miele g 7100 sc dishwasher",
    "intel core i7-12700k processor box",
    "amd ryzen 9 5950x 16-core 3.4 ghz",
    "canon eos 250d dslr camera 24.1mp",
    "nikon z6 ii mirrorless body",
    "google pixel 7 pro 128gb",
    "tv",
    "a",
    "fridge",
    "cpu",
    "How do I reset my password?",
    "where is my order",
    "I want a refund for a damaged item",
    "cancel my subscription please",
    "track delivery 123456789",
    "my card payment was declined twice",
    "how to change the account email address",
    "what is the best phone under 300 pounds",
    "which washer is the quietest",
    "is this tv compatible with hdmi 2.1",
    "Instruct: classify the product\nQuery: blue kettle",
    "query: cheap laptop",
    "passage: The quick brown fox jumps over the lazy dog.",
    "The Eiffel Tower is located in Paris.",
    "Photosynthesis converts light energy into chemical energy.",
    "The capital of Australia is Canberra, not Sydney.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Neural networks learn representations from data.",
    "A contrastive loss pulls positives together and pushes negatives apart.",
    "FAISS builds approximate nearest neighbour indexes.",
    "LoRA adds low-rank updates to frozen weights.",
    "1234567890",
    "3.14159 2.71828 1.41421",
    "£499.99 – 20% off!!!",
    "#1 best seller (2024) *** free shipping ***",
    "e-mail: support@example.com, tel. +44 20 7946 0000",
    "C++ / C# / F# developers",
    "<html><body>hello</body></html>",
    "   leading and trailing spaces   ",
    "UPPER CASE TEXT SHOULD STILL EMBED",
    "mIxEd CaSe ProDuct NaMe",
    "新しいスマートフォン",
    "Смартфон с хорошей камерой",
    "téléviseur écran plat 4k",
    "Waschmaschine mit Trockner",
    "teléfono móvil libre",
    "emoji 😀 👍 test",
    "tab\tseparated\tvalues",
    "line one\nline two",
    "repeat repeat repeat repeat repeat",
    "ok",
    "no",
    "yes please",
    "white goods",
    "kitchen appliances and small electricals",
    "gaming laptop with rtx 4070 and 32gb ram",
    "noise cancelling wireless headphones",
    " ".join(["long product description with many repeated words to exceed the maximum sequence length"] * 40),
)


class ExportError(ValueError):
    """An export cannot be made or does not match its adapter; the message has the figures and the fix."""


# ---------------------------------------------------------------------------------------
# Export


def export_merged(adapter_dir: str | Path, out_dir: str | Path, model_name: str | None = None, dtype: str = "fp32",
                  overwrite: bool = False, probe_texts: list[str] | None = None, cfg: ExportConfig | None = None,
                  onnx: bool = False, device: str = "cpu", source: str | None = None) -> dict:
    """Merge the adapter into its base, save a plain sentence-transformers folder, check parity; returns the report.

    `cfg` None: the `export:` section of the experiment the adapter was trained with (its embedft_meta.json).
    `source`: where the adapter came from, recorded instead of `adapter_dir` (e.g. runs:/<id>/adapter
    for a temporary download).
    """
    import torch

    from embedft.lora import load_adapter, read_adapter_meta

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    # Everything that can be checked without a model is checked first.
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    _check_out_dir(out, overwrite)
    if onnx:
        from embedft.export_onnx import require_onnx

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

    tmp = temp_sibling(out)
    try:
        st.save(str(tmp))
        (tmp / PROBES_FILE).write_text(json.dumps(probes, indent=1, ensure_ascii=False), encoding="utf-8")
        np.save(tmp / PROBE_EMB_FILE, ref.astype(np.float32))
        parity = _parity(tmp, probes, ref, tol, device)
        if not parity["ok"]:
            raise ExportError(f"parity check failed for the {dtype} export of {adapter_dir}: {parity_summary(parity)}; "
                              f"the export was not written")
        report: dict[str, Any] = {
            "out_dir": str(out), "dtype": dtype, "tolerances": tol, "parity": parity,
            "merge_max_abs_diff": merge_diff, "adapter_max_delta_weight": delta_w,
            "adapter_vs_base_max_abs_diff": effect, "n_probes": len(probes),
            "spec": encoder.spec.to_json(), "query_prompt": query_prompt,
            "weights_digest": weights_digest(tmp),
        }
        if onnx:
            from embedft.export_onnx import ONNX_TOLERANCES, export_onnx

            report["onnx"] = export_onnx(tmp, probes, ref, encoder.spec, _looser(tol, ONNX_TOLERANCES))
        (tmp / EXPORT_META).write_text(json.dumps({
            **{k: v for k, v in report.items() if k != "out_dir"},
            "adapter": {"dir": source or str(adapter_dir), "meta": meta, "lora": lora_summary(lora_cfg)},
            "probe_embeddings": "float32 (2, N, D): [0] documents, [1] queries (prompt_name='query')",
            "versions": _versions(),
        }, indent=2, default=str), encoding="utf-8")
        (tmp / "README.md").write_text(model_card(out.name, encoder.spec.to_json(), meta, lora_cfg, adapter_dir,
                                                   query_prompt, report), encoding="utf-8")
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> %s (%s): %s", adapter_dir, out, dtype, parity_summary(parity))
    return report


def verify_export(model_dir: str | Path, min_cosine: float | None = None, max_abs_diff: float | None = None,
                  device: str = "cpu") -> dict:
    """Reload an export with plain sentence-transformers and compare the probes with the saved reference vectors."""
    d = Path(model_dir)
    if not d.is_dir():
        what = "is a file, not an export folder" if d.exists() else "does not exist"
        raise ExportError(f"{d} {what}; pass the folder `embedft export --out` wrote")
    for f in (PROBES_FILE, PROBE_EMB_FILE):
        if not (d / f).is_file():
            raise ExportError(f"{d}: missing {f}, so there is nothing to verify against; "
                              f"this is not an embedft export (re-export with `embedft export`)")
    probes = _saved(d / PROBES_FILE, lambda f: json.loads(f.read_text(encoding="utf-8")))
    ref = _saved(d / PROBE_EMB_FILE, np.load)
    if ref.ndim != 3 or ref.shape[0] != 2 or ref.shape[1] != len(probes):
        raise ExportError(f"{d / PROBE_EMB_FILE}: shape {ref.shape} does not match {len(probes)} probes "
                          f"(expected (2, {len(probes)}, dim)); re-export")
    saved = _saved(d / EXPORT_META, lambda f: json.loads(f.read_text())) if (d / EXPORT_META).is_file() else {}
    tol = dict(saved.get("tolerances") or {"min_cosine": ExportConfig.min_cosine, "max_abs_diff": ExportConfig.max_abs_diff})
    if min_cosine is not None:
        tol["min_cosine"] = min_cosine
    if max_abs_diff is not None:
        tol["max_abs_diff"] = max_abs_diff
    try:
        parity = _parity(d, probes, ref, tol, device)
    except Exception as e:  # transformers' and safetensors' errors (missing or truncated weights) name no fix
        raise ExportError(f"{d} cannot be loaded by sentence-transformers ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}); the export is damaged: copy it again or re-export") from e
    if not parity["ok"]:
        raise ExportError(f"{d} no longer matches its reference embeddings: {parity_summary(parity)}")
    from embedft.export_onnx import ONNX_FILE, ONNX_TOLERANCES, onnx_parity

    if (d / ONNX_FILE).is_file():
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            parity["onnx"] = {"ok": None, "skipped": "onnxruntime is not installed (pip install onnxruntime)"}
        else:
            try:
                parity["onnx"] = onnx_parity(d, probes, ref, _looser(tol, ONNX_TOLERANCES))
            except Exception as e:  # onnxruntime's own errors (a truncated or corrupt graph) name no file
                raise ExportError(f"{d / ONNX_FILE} cannot be run by onnxruntime ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300]}); re-export with --onnx") from e
            if not parity["onnx"]["ok"]:
                raise ExportError(f"{d / ONNX_FILE} no longer matches its reference embeddings: "
                                  f"{parity_summary(parity['onnx'])}")
    return parity


def _saved(path: Path, load):
    # One of embedft's own files of an export, read back; a damaged one is named, not a JSON or numpy traceback.
    try:
        return load(path)
    except (ValueError, OSError, EOFError) as e:
        raise ExportError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:300]}); the export is "
                          "damaged: copy it again or re-export") from e


# ---------------------------------------------------------------------------------------
# Identity of an export (index manifests record it: embedft.deploy)


def _weight_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
    if not files:
        raise ExportError(f"{d}: no model weights (*.safetensors) found; is this a sentence-transformers folder?")
    return files


def weights_stat(model_dir: str | Path) -> dict[str, list[int]]:
    """The export's weight files as the file system sees them: name -> [size, mtime, ctime (ns), inode, device].

    Equal stats mean the very same files, unchanged (a write or a copy changes the ctime, which
    no user can set), so `weights_digest` need not read them again (`index search`)."""
    out = {}
    for f in _weight_files(model_dir):
        st = f.stat()
        out[f.name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    return out


def weights_digest(model_dir: str | Path) -> str:
    """First 16 hex of the sha256 over the export's weight files (identifies the model in index manifests)."""
    h = hashlib.sha256()
    for f in _weight_files(model_dir):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Helpers


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


def _probe_list(probe_texts: Sequence[str] | None, n: int) -> list[str]:
    probes = list(probe_texts) if probe_texts is not None else list(DEFAULT_PROBES[:n])
    bad = [i for i, t in enumerate(probes) if not isinstance(t, str) or not t.strip()]
    if not probes or bad:
        raise ExportError(f"probe_texts must be non-empty strings; bad entries at {bad[:10] or 'all (empty list)'}")
    return probes


def _load_base(spec: dict, model_name: str | None, meta: dict, lora_cfg: dict, device: str):
    """The adapter's base model as an Encoder whose behaviour (pooling, prompts, ...) is the adapter's spec."""
    from embedft.models import ModelError, load_encoder

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


def _tolerances(dtype: str, cfg: ExportConfig) -> dict[str, float]:
    if dtype == "fp32":
        return {"min_cosine": cfg.min_cosine, "max_abs_diff": cfg.max_abs_diff}
    loose = REDUCED_TOLERANCES[dtype]
    # A config looser than the dtype's default wins; a stricter one cannot be met in reduced precision.
    return {"min_cosine": min(cfg.min_cosine, loose["min_cosine"]), "max_abs_diff": max(cfg.max_abs_diff, loose["max_abs_diff"])}


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


def compare_embeddings(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Row-wise cosine and element-wise absolute difference between two (N, D) arrays."""
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        return {"min_cosine": float("nan"), "max_abs_diff": float("inf"), "mean_cosine": float("nan")}
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    # Two zero vectors agree; a row with a NaN or inf keeps a NaN cosine, so it fails the check.
    with np.errstate(invalid="ignore"):
        cos = np.where(norms == 0, 1.0, (ref * got).sum(1) / np.maximum(norms, 1e-30))
    return {"min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(ref - got).max()),
            "mean_cosine": float(cos.mean())}


def _parity(model_dir: Path, probes: list[str], ref: np.ndarray, tol: dict[str, float], device: str | None) -> dict:
    """Plain sentence-transformers load of model_dir vs the reference (2, N, D) vectors."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device=device)
    docs = model.encode(probes, normalize_embeddings=False, convert_to_numpy=True)
    queries = model.encode(probes, prompt_name="query", normalize_embeddings=False, convert_to_numpy=True)
    return parity_figures(ref, docs, queries, tol)


def parity_figures(ref: np.ndarray, docs: np.ndarray, queries: np.ndarray, tol: dict[str, float]) -> dict:
    """Compare (N, D) document and query vectors with the reference (2, N, D) under a tolerance."""
    per = {"documents": compare_embeddings(ref[0], docs), "queries": compare_embeddings(ref[1], queries)}
    # np.min/np.max carry a NaN; Python's min/max keep the first value when the other is NaN.
    min_cos = float(np.min([v["min_cosine"] for v in per.values()]))
    max_abs = float(np.max([v["max_abs_diff"] for v in per.values()]))
    ok = bool(min_cos >= tol["min_cosine"] and max_abs <= tol["max_abs_diff"])  # NaN compares False
    return {"ok": ok, "min_cosine": min_cos, "max_abs_diff": max_abs, **per, "tolerances": dict(tol),
            "n_probes": int(ref.shape[1])}


def _looser(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {"min_cosine": min(a["min_cosine"], b["min_cosine"]), "max_abs_diff": max(a["max_abs_diff"], b["max_abs_diff"])}


def parity_summary(parity: dict) -> str:
    """One line of parity figures against their tolerances, for messages and logs."""
    t = parity["tolerances"]
    return (f"min cosine {parity['min_cosine']:.7f} (need >= {t['min_cosine']}), max abs diff "
            f"{parity['max_abs_diff']:.3g} (need <= {t['max_abs_diff']:.3g}) over {parity['n_probes']} probes "
            f"as documents and queries")


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if overwrite:
        replace_dir(tmp, out)
        return
    try:
        place_new_dir(tmp, out)
    except FileExistsError as e:  # _check_out_dir passed, but another export wrote `out` while this one ran
        raise ExportError(f"export folder {out} appeared while this export ran (another export to the same --out?); "
                          f"it was left as it is: pass --overwrite to replace it") from e


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("embedft", "sentence-transformers", "transformers", "peft", "torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
