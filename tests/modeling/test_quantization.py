"""QLoRA (train.base_quantization) without bitsandbytes or a GPU: what embedft hands transformers,
and what the train recipe does around a quantised base, with a stand-in for bitsandbytes' load.
The refusals before any model loads are in tests/data/test_data.py; the real thing runs in
benchmarks/bench_qlora.py on a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from embedft.config import LoraConfig, ModelConfig, config_from_dict
from embedft.errors import ModelError
from embedft.modeling.quantization import is_quantized, quantized_load_kwargs, trained_quantization


def test_nf4_and_int8_hand_transformers_a_bitsandbytes_config_and_a_cuda_placement():
    kw = quantized_load_kwargs("nf4", "cuda:1")
    q = kw["quantization_config"]
    assert q.load_in_4bit and not q.load_in_8bit and q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and q.bnb_4bit_use_double_quant
    assert kw["dtype"] == torch.bfloat16 and kw["device_map"] == {"": 1}  # the rest of the base in bf16, on that GPU
    kw = quantized_load_kwargs("int8", torch.device("cuda", 0))
    assert kw["quantization_config"].load_in_8bit and not kw["quantization_config"].load_in_4bit
    assert kw["dtype"] == torch.bfloat16 and kw["device_map"] == {"": 0}
    with pytest.raises(ModelError, match="CUDA device, not cpu"):
        quantized_load_kwargs("nf4", "cpu")
    with pytest.raises(ModelError, match="use nf4 or int8"):
        quantized_load_kwargs("fp4", "cuda:0")


def test_int8s_cast_notice_is_silenced_and_nothing_else(caplog):
    import logging

    quantized_load_kwargs("int8", "cuda:0")
    quantized_load_kwargs("int8", "cuda:0")  # one filter, however many loads
    bnb = logging.getLogger("bitsandbytes.autograd._functions")
    assert len(bnb.filters) == 1
    with caplog.at_level(logging.WARNING, logger=bnb.name):
        bnb.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.bfloat16")
        bnb.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_a_quantised_load_hands_them_to_sentence_transformers_and_is_not_moved_after(tiny_qwen3_dir, monkeypatch):
    import sentence_transformers

    from embedft.modeling.encoder import Encoder, load_encoder

    real, seen = sentence_transformers.SentenceTransformer, []

    def bitsandbytes_load(path, **kw):  # the unquantised tiny model, on the CPU, in its place
        seen.append(kw)
        return real(path, device="cpu", trust_remote_code=kw["trust_remote_code"])

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", bitsandbytes_load)
    plain = load_encoder(ModelConfig(name=str(tiny_qwen3_dir)), "cpu")
    assert seen[-1] == {"device": "cpu", "trust_remote_code": False}  # unquantised: as ever
    monkeypatch.setattr(Encoder, "to", lambda *a, **k: pytest.fail("moved after transformers placed it"))
    quantised = load_encoder(ModelConfig(name=str(tiny_qwen3_dir)), "cuda:0", quantization="nf4")
    assert "device" not in seen[-1] and seen[-1]["model_kwargs"]["device_map"] == {"": 0}
    assert seen[-1]["model_kwargs"]["quantization_config"].bnb_4bit_quant_type == "nf4"
    assert quantised.spec == plain.spec  # the stand-in's weights are not quantised, so even the fingerprint


def test_make_trainable_leaves_a_quantised_base_in_its_dtypes(tiny_qwen3_dir):
    from embedft.modeling.builders import make_trainable
    from embedft.modeling.encoder import load_encoder

    class Params4bit(torch.nn.Parameter):  # bitsandbytes' 4-bit weight, as is_quantized knows it: by name
        pass

    enc = load_encoder(ModelConfig(name=str(tiny_qwen3_dir)), "cpu")
    assert not is_quantized(enc.backbone)
    up = enc.backbone.layers[0].mlp.up_proj
    up.weight = Params4bit(up.weight.data, requires_grad=False)
    assert is_quantized(enc.backbone)
    make_trainable(enc, LoraConfig(r=4), torch.bfloat16)  # a plain base would be cast to bf16 here
    frozen = {p.dtype for n, p in enc.backbone.named_parameters() if "lora_" not in n}
    trained = [(p.dtype, p.requires_grad) for n, p in enc.backbone.named_parameters() if "lora_" in n]
    assert frozen == {torch.float32} and trained and set(trained) == {(torch.float32, True)}


def test_trained_quantization_reads_an_adapters_config():
    assert trained_quantization({"config": {"train": {"base_quantization": "nf4"}}}) == "nf4"
    assert trained_quantization({"config": {"train": {"base_quantization": "none"}}}) is None
    assert trained_quantization({"config": {"train": {}}}) is None and trained_quantization({}) is None


def _csv(path, groups: range, per_group: int):
    lines = ["text,group"] + [f"item {g} variant {j} colour {g * 7 % 5},{g}" for g in groups for j in range(per_group)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_recipe_trains_the_quantised_base_and_reports_and_exports_on_the_unquantised_one(
        tiny_qwen3_dir, tmp_path, monkeypatch):
    """The base is evaluated unquantised, trained quantised (a stand-in here), the adapter saved with the
    unquantised base's spec, reloaded on the unquantised base for the final evaluation, and the report
    and the export's model card say so."""
    from embedft.export.merge import export_merged
    from embedft.modeling import builders, encoder as encoder_mod, quantization, runtime
    from embedft.recipes.train import run_train

    monkeypatch.setattr(quantization, "check_quantization", lambda train: None)  # as on a CUDA machine with bitsandbytes
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)  # an fp32 base: only QLoRA asks for the reload
    real_load, loads, quantised = encoder_mod.load_encoder, [], []

    def load_encoder(model, device="cpu", lora=None, quantization=None):
        loads.append(quantization)
        return real_load(model, device, lora)

    def load_quantized(model, device, lora, quantization, spec):
        enc = real_load(model, device, lora)  # bitsandbytes' load, unquantised, in its place
        quantised.append((quantization, spec, enc.spec))
        enc.spec = spec
        return enc

    monkeypatch.setattr(encoder_mod, "load_encoder", load_encoder)
    monkeypatch.setattr(builders, "load_quantized", load_quantized)
    cfg = config_from_dict({
        "name": "qlora", "model": {"name": str(tiny_qwen3_dir)},
        "data": {"train": str(_csv(tmp_path / "train.csv", range(12), 3)), "eval": str(_csv(tmp_path / "eval.csv",
                 range(100, 106), 2)), "split": "given", "shape": "grouped", "text_column": "text",
                 "group_column": "group"},
        "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "base_quantization": "nf4",
                  "output_dir": str(tmp_path / "run"), "val_fraction": 0, "select_best": False, "patience": None},
        "tracking": {"enabled": False}})
    summary = run_train(cfg, progress=False)
    assert loads == [None, None]  # the base for its evaluation, then again under the saved adapter
    ((q, spec, _),) = quantised
    assert q == "nf4" and summary["steps"] >= 1
    adapter_meta = json.loads((tmp_path / "run" / "adapter" / "embedft_meta.json").read_text())
    assert adapter_meta["spec"] == spec.to_json() and adapter_meta["config"]["train"]["base_quantization"] == "nf4"
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["meta"]["base_quantization"] == "nf4"
    assert "- base: trained on the base quantised to nf4 by bitsandbytes (QLoRA); evaluated and exported on the " \
           "unquantised base" in (tmp_path / "run" / "eval" / "report.md").read_text()

    export_merged(tmp_path / "run" / "adapter", tmp_path / "export")  # merges into the base it loads unquantised
    card = (tmp_path / "export" / "README.md").read_text()
    assert "trained on the base quantised to nf4 by bitsandbytes (QLoRA); the LoRA weights are merged into the " \
           "unquantised base" in card
