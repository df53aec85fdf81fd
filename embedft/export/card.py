"""The model card (README.md) of an export: how to load it, what it was trained from, its parity figures."""

from __future__ import annotations

from pathlib import Path

from embedft.modeling.quantization import trained_quantization


def lora_summary(lora_cfg: dict) -> dict:
    """The LoRA settings worth recording from a peft adapter_config.json (targets sorted)."""
    keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora", "peft_version")
    out = {k: lora_cfg[k] for k in keys if k in lora_cfg}
    if isinstance(out.get("target_modules"), (list, set, tuple)):
        out["target_modules"] = sorted(out["target_modules"])
    return out


def _eval_table(adapter_dir: Path) -> str | None:
    # The training run's base-vs-adapted table, when the adapter sits in a run folder beside eval/.
    report = adapter_dir.resolve().parent / "eval" / "report.md"
    if not report.is_file():
        return None
    lines = [ln for ln in report.read_text(encoding="utf-8").splitlines() if ln.startswith("|")]
    return "\n".join(lines) or None


def model_card(name: str, spec: dict, meta: dict, lora_cfg: dict, adapter_dir: Path, query_prompt: str,
               report: dict) -> str:
    """README.md of an export: front matter for the hub, usage, model and LoRA facts, evaluation, parity."""
    base = spec.get("base_model", "?")
    lora = lora_summary(lora_cfg)
    is_hub_id = base.count("/") == 1 and not Path(base).exists()
    front = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
             "tags: [sentence-transformers, feature-extraction, embedft, lora-merged]"]
    if is_hub_id:
        front.append(f"base_model: {base}")
    front.append("---")
    parity = report["parity"]
    lines = [
        *front, "",
        f"# {name}", "",
        f"`{base}` fine-tuned with LoRA by embedft and merged into the base weights. It is a plain "
        f"sentence-transformers model: no peft or embedft needed to use it.", "",
        "## How to use", "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'model = SentenceTransformer("{name}")  # or the folder path',
        "doc_emb = model.encode(documents)",
        'query_emb = model.encode(queries, prompt_name="query")',
        "scores = query_emb @ doc_emb.T" + ("  # embeddings are unit length: dot = cosine" if spec.get("normalize") else ""),
        "```", "",
        (f"Query prompt (prepended to queries by `prompt_name=\"query\"`): `{query_prompt!r}`. Documents get no prompt."
         if query_prompt else "No prompts: queries and documents are embedded the same way "
                              "(`prompt_name=\"query\"` is accepted and adds nothing)."), "",
        "## Model", "",
        f"- base model: `{base}` (type {spec.get('model_type')}, fingerprint {spec.get('fingerprint')})",
        f"- family {spec.get('family')}, pooling {spec.get('pooling')}, normalize {spec.get('normalize')}, "
        f"padding side {spec.get('padding_side')}, max length {spec.get('max_length')}, dim {spec.get('hidden_size')}",
        f"- weights dtype: {report['dtype']}",
        f"- LoRA: r={lora.get('r')}, alpha={lora.get('lora_alpha')}, dropout={lora.get('lora_dropout')}, "
        f"targets={', '.join(lora.get('target_modules') or [])}",
    ]
    quantization = trained_quantization(meta)
    if quantization:
        lines.append(f"- trained on the base quantised to {quantization} by bitsandbytes (QLoRA); the LoRA weights are "
                     "merged into the unquantised base")
    if meta.get("experiment"):
        lines.append(f"- experiment: {meta['experiment']}")
    if meta.get("mlflow_run_id"):
        lines.append(f"- MLflow run: {meta['mlflow_run_id']}")
    if meta.get("data"):
        lines += ["", "## Training data", ""] + [f"- {k}: {v}" for k, v in meta["data"].items()]
    table = _eval_table(adapter_dir)
    if table:
        lines += ["", "## Evaluation (base vs adapted, from the training run)", "", table]
    lines += ["", "## Parity with the adapter model", "",
              f"{parity['n_probes']} probe texts (probes.json) embedded by the unmerged adapter model in fp32 "
              f"(probe_embeddings.npy) and by this folder loaded with plain sentence-transformers:", "",
              f"- min cosine {parity['min_cosine']:.7f} (tolerance >= {report['tolerances']['min_cosine']})",
              f"- max abs diff {parity['max_abs_diff']:.3g} (tolerance <= {report['tolerances']['max_abs_diff']:.3g})",
              "", "Re-check on any machine with `embedft verify <folder>`.", ""]
    return "\n".join(lines)
