"""Model families, pooling, padding, prompts and LoRA targets on tiny random models."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from embedft.config import LoraConfig, ModelConfig
from embedft.errors import ModelError
from embedft.modeling.encoder import load_encoder
from embedft.modeling.families import resolve_model_path
from embedft.modeling.lora import apply_lora, load_adapter, read_adapter_meta, save_adapter
from embedft.modeling.runtime import sdpa_backends

TEXTS = ["apple iphone 8 plus 64gb silver", "tv", "bosch serie 6 washing machine 9kg 1400 rpm white",
         "intel core i7 processor box", "a"]


def test_bert_family_targets_qkv(tiny_bert_dir):
    enc = load_encoder(ModelConfig(name=str(tiny_bert_dir)))
    assert (enc.spec.family, enc.spec.pooling, enc.spec.padding_side) == ("bert", "mean", "right")
    apply_lora(enc, LoraConfig(r=4))
    lora_layers = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in enc.named_parameters() if "lora_A" in n}
    assert lora_layers == {"query", "key", "value"}  # K included (peft's own default is Q and V only)
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_qwen3_family_targets_and_settings(tiny_qwen3_dir):
    enc = load_encoder(ModelConfig(name=str(tiny_qwen3_dir), task="find the product"))
    spec = enc.spec
    assert (spec.family, spec.pooling, spec.padding_side) == ("decoder", "lasttoken", "left")
    assert spec.query_template == "Instruct: find the product\nQuery:{text}"
    apply_lora(enc, LoraConfig(r=4))
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in enc.named_parameters() if "lora_A" in n} == {"q_proj", "k_proj", "v_proj"}


def test_forward_builds_no_kv_cache(tiny_model_dir):
    # An embedder never generates. A decoder left at its config's use_cache=True built a KV cache on
    # every forward (a copy of K and V per layer), and under train.compile the cache's per-layer
    # state recompiled each layer until torch's limit, leaving the rest eager (H200 profile).
    enc = load_encoder(ModelConfig(name=str(tiny_model_dir)))
    apply_lora(enc, LoraConfig(r=4))
    inner = enc.backbone.get_base_model() if hasattr(enc.backbone, "get_base_model") else enc.backbone
    outputs = []
    inner.register_forward_hook(lambda m, args, kwargs, out: outputs.append(out), with_kwargs=True)
    inner.config.use_cache = True  # as the published configs and transformers 5.17 (the GPU image's) leave it
    enc.train()(**enc.collate(enc.tokenize(TEXTS)))
    with torch.no_grad():
        enc.eval().encode(TEXTS)
    assert len(outputs) >= 2  # the training forward and the encode batches
    assert all(getattr(o, "past_key_values", None) is None and getattr(o, "cache", None) is None for o in outputs)


@pytest.mark.slow
def test_compiled_layers_share_one_graph(tmp_path):
    # train.compile on a decoder whose config asks for a KV cache: the cache's per-layer state used to
    # make each layer a recompile, and past torch's limit of 8 the remaining layers ran eager.
    from torch._dynamo.utils import counters

    from embedft.modeling.encoder import compile_layers
    from embedft_testing.synthetic import tiny_qwen3

    enc = load_encoder(ModelConfig(name=str(tiny_qwen3(tmp_path, layers=3))))
    enc.backbone.config.use_cache = True
    assert compile_layers(enc) == 3
    torch._dynamo.reset()
    counters.clear()
    enc.train()(**enc.collate(enc.tokenize(TEXTS))).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("fam, block", [
    ("bert", {"attention.output.dense", "intermediate.dense", "output.dense"}),
    ("qwen3", {"o_proj", "gate_proj", "up_proj", "down_proj"})])
def test_lora_targets_all_adds_every_block_linear_layer_and_nothing_else(fam, block, tiny_bert_dir, tiny_qwen3_dir):
    from torch import nn

    from embedft.modeling.lora import lora_settings

    enc = load_encoder(ModelConfig(name=str(tiny_bert_dir if fam == "bert" else tiny_qwen3_dir)))
    qkv = {"bert": {"query", "key", "value"}, "qwen3": {"q_proj", "k_proj", "v_proj"}}[fam]
    apply_lora(enc, LoraConfig(r=4, targets="all"))
    adapted = {n.split(".lora_A")[0].removeprefix("base_model.model.") for n, _ in enc.backbone.named_parameters()
               if "lora_A" in n}
    # Every Linear of the model (an adapted one's sits under .base_layer), the LoRA matrices aside.
    linear = {n.removeprefix("base_model.model.").removesuffix(".base_layer")
              for n, m in enc.backbone.named_modules() if isinstance(m, nn.Linear) and ".lora_" not in n}
    assert adapted == {n for n in linear if re.search(r"(^|\.)layers?\.\d+\.", n)}  # every block's, nothing else
    assert fam != "bert" or ("pooler.dense" in linear and "pooler.dense" not in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == qkv | {b.rsplit(".", 1)[-1] for b in block}
    assert set(lora_settings(enc, LoraConfig(targets="all"))["target_modules"]) == qkv | block


def test_lora_targets_that_are_no_linear_layer_are_named_with_the_layers_there_are(tiny_bert_dir):
    enc = load_encoder(ModelConfig(name=str(tiny_bert_dir)))
    with pytest.raises(ModelError) as e:
        apply_lora(enc, LoraConfig(r=4, target_modules=("query", "q_proj", "self.value")))
    msg = str(e.value)
    assert "['q_proj']" in msg and "intermediate" not in msg.split("are:")[0]  # suffixes of real layers pass
    assert "dense, key, query, value" in msg and "lora.target_modules" in msg


def test_eos_appended_exactly_once(tiny_qwen3_dir):
    enc = load_encoder(ModelConfig(name=str(tiny_qwen3_dir)))
    eos = enc.tokenizer.convert_tokens_to_ids(enc.tokenizer.eos_token)
    for ids in enc.tokenize(TEXTS) + enc.tokenize(TEXTS, is_query=True):
        assert ids[-1] == eos and ids.count(eos) == 1
    # Loading again (the tokenizer already appends it) must not append a second one.
    enc2 = load_encoder(ModelConfig(name=str(tiny_qwen3_dir)))
    assert enc2.tokenize(["tv"]) == enc.tokenize(["tv"])


def _reference_ids(enc, texts, is_query=False):
    # transformers' own call, as Encoder.tokenize made it before it called the Rust tokenizer directly.
    return enc.tokenizer(enc.format(texts, is_query), truncation=True, max_length=enc.spec.max_length,
                         padding=False, return_attention_mask=False)["input_ids"]


def test_tokenize_gives_the_ids_of_the_transformers_call(tiny_model_dir):
    enc = load_encoder(ModelConfig(name=str(tiny_model_dir), max_length=8))
    rust = enc.tokenizer.backend_tokenizer
    rust.enable_padding(length=32, pad_id=0, pad_token="[PAD]")  # as all-MiniLM-L6-v2's tokenizer.json has it
    rust.enable_truncation(32)
    before = (rust.truncation, rust.padding, rust.encode_special_tokens)
    special = enc.tokenizer.eos_token or enc.tokenizer.sep_token
    texts = TEXTS + ["", "  spaced   out  ", f"with {special} inside", "ünïcödé ☃ 日本語", "word " * 40]
    ids = {q: enc.tokenize(texts, is_query=q) for q in (False, True)}
    # transformers' call below leaves its own settings behind; Encoder.tokenize puts back what was
    # there, which an export saves in tokenizer.json.
    assert (rust.truncation, rust.padding, rust.encode_special_tokens) == before
    for is_query in (False, True):
        assert ids[is_query] == _reference_ids(enc, texts, is_query)
        assert max(map(len, ids[is_query])) == 8  # truncated to max_length, never padded
    enc.tokenizer.truncation_side = "left"  # a tokenizer that keeps the end of long texts
    assert enc.tokenize(texts) == _reference_ids(enc, texts) != ids[False]


def test_tokenize_falls_back_to_the_transformers_call_for_other_tokenizers(tiny_bert_dir):
    from embedft.modeling.tokenizer import _rust_tokenizer

    enc = load_encoder(ModelConfig(name=str(tiny_bert_dir)))
    assert _rust_tokenizer(enc.tokenizer) is enc.tokenizer.backend_tokenizer
    calls = []

    class Custom(type(enc.tokenizer)):  # a tokenizer whose encode path does its own work in Python
        def _encode_plus(self, *a, **k):
            calls.append(1)
            return super()._encode_plus(*a, **k)

    base = type(enc.tokenizer)
    enc.tokenizer.__class__ = Custom
    assert _rust_tokenizer(enc.tokenizer) is None
    assert enc.tokenize(TEXTS) == _reference_ids(enc, TEXTS) and calls

    class CustomBatch(base):  # transformers 4's batch path overridden instead
        def _batch_encode_plus(self, *a, **k):
            return super()._batch_encode_plus(*a, **k)

    enc.tokenizer.__class__ = CustomBatch
    assert _rust_tokenizer(enc.tokenizer) is None


def test_repeated_texts_are_embedded_once_and_returned_in_input_order(tiny_bert_dir):
    enc = load_encoder(ModelConfig(name=str(tiny_bert_dir)))
    rows = []
    real = enc.forward
    enc.forward = lambda input_ids, attention_mask: rows.append(len(input_ids)) or real(input_ids, attention_mask)
    texts = [TEXTS[i] for i in (2, 0, 2, 1, 0, 2, 3)]
    vecs = enc.encode(texts, batch_size=2)
    assert sum(rows) == 4  # the four distinct texts
    distinct = enc.encode([TEXTS[i] for i in (0, 1, 2, 3)])
    np.testing.assert_allclose(vecs, distinct[[2, 0, 2, 1, 0, 2, 3]], atol=1e-6)


def test_encode_returns_each_texts_own_vector_on_each_device(tiny_model_dir, device):
    # Batches of 2 over 14 texts: on CUDA more batches are in flight than the copy queue holds.
    enc = load_encoder(ModelConfig(name=str(tiny_model_dir)), device)
    enc.eval()
    texts = [f"{t} {i}" for i in range(2) for t in TEXTS] + ["x", "y y y y y y y y", "z z", "w"]
    got = enc.encode(texts, batch_size=2, amp=False)
    with torch.no_grad():
        one_by_one = np.concatenate([enc(**enc.collate([x], device)).float().cpu().numpy() for x in enc.tokenize(texts)])
    np.testing.assert_allclose(got, one_by_one, atol=1e-5)


def test_cuda_gather_collects_each_copy_depth_batches_later(monkeypatch):
    # The queue's bookkeeping, with CUDA's events and pinned memory stood in for on the CPU.
    from embedft.modeling import encoder as models

    waited = []

    class Event:
        def record(self, stream):
            self.n = len(recorded)
            recorded.append(self)

        def synchronize(self):
            waited.append(self.n)

    recorded = []
    real_empty = torch.empty
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    out = np.zeros((6, 2), dtype=np.float32)
    gather = models._Gather(out, torch.device("cuda"), depth=2)
    for b in range(3):
        gather.put(np.array([2 * b + 1, 2 * b]), torch.full((2, 2), b + 1.0))
    assert waited == [0]  # the third batch waits for the first copy only
    assert out[:2].tolist() == [[1, 1], [1, 1]] and not out[2:].any()
    gather.close()
    assert waited == [0, 1, 2] and out[:, 0].tolist() == [1, 1, 2, 2, 3, 3]


def test_encode_puts_the_training_mode_back_when_a_batch_fails(tiny_bert_dir):
    enc = load_encoder(ModelConfig(name=str(tiny_bert_dir)))
    enc.train()

    def fail(*a, **k):
        raise RuntimeError("CUDA out of memory")

    enc.forward = fail
    with pytest.raises(RuntimeError, match="out of memory"):
        enc.encode(TEXTS)
    assert enc.training and enc.backbone.training


def test_instruction_on_queries_only(tiny_qwen3_dir):
    enc = load_encoder(ModelConfig(name=str(tiny_qwen3_dir), task="t"))
    assert enc.format(["x"], is_query=True) == ["Instruct: t\nQuery:x"]
    assert enc.format(["x"], is_query=False) == ["x"]
    q = enc.encode(["apple tv"], is_query=True)
    d = enc.encode(["apple tv"], is_query=False)
    assert not np.allclose(q, d)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_equals_single_under_padding(tiny_model_dir, padding_side, device):
    enc = load_encoder(ModelConfig(name=str(tiny_model_dir)), device)
    if enc.spec.family == "bert" and padding_side == "left":
        pytest.skip("BERT uses absolute positions: right padding only, as its family says")
    from dataclasses import replace

    enc.spec = replace(enc.spec, padding_side=padding_side)
    enc.eval()
    ids = enc.tokenize(TEXTS)
    padded = enc.collate(ids, device)  # one batch, every text but the longest padded
    assert (padded["attention_mask"] == 0).sum() > 0
    with torch.no_grad():
        batch = enc(**padded).cpu().numpy()
        single = np.concatenate([enc(**enc.collate([x], device)).cpu().numpy() for x in ids])
    assert np.abs(batch - single).max() <= 1e-5
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    # encode() (length-sorted chunks) gives the same vectors; fp32 on CUDA too (amp=False).
    assert np.abs(enc.encode(TEXTS, batch_size=len(TEXTS), amp=False) - single).max() <= 1e-5


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_collate_pads_each_row_on_the_family_side(tiny_bert_dir, padding_side):
    from dataclasses import replace

    enc = load_encoder(ModelConfig(name=str(tiny_bert_dir)))
    enc.spec = replace(enc.spec, padding_side=padding_side)
    p = enc.tokenizer.pad_token_id
    batch = enc.collate([[5, 6, 7], [8], [9, 10]])
    if padding_side == "right":
        want_ids, want_mask = [[5, 6, 7], [8, p, p], [9, 10, p]], [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    else:
        want_ids, want_mask = [[5, 6, 7], [p, p, 8], [p, 9, 10]], [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert batch["input_ids"].tolist() == want_ids and batch["attention_mask"].tolist() == want_mask
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long


def test_minilm_alias_resolves_to_packaged_folder():
    path = resolve_model_path("minilm")
    assert path.endswith("model") and (__import__("pathlib").Path(path) / "modules.json").is_file()


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        resolve_model_path(str(tmp_path / "nope"))


def test_a_folder_that_is_not_a_loadable_model_is_a_model_error(tmp_path, tiny_bert_dir):
    import shutil

    (tmp_path / "empty").mkdir()
    truncated = Path(shutil.copytree(tiny_bert_dir, tmp_path / "truncated"))
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(100)
    no_tokenizer = Path(shutil.copytree(tiny_bert_dir, tmp_path / "no-tokenizer",
                                        ignore=shutil.ignore_patterns("tokenizer*", "vocab.txt")))
    for folder, why in (("empty", r"is not a model transformers can load \(ValueError: Unrecognized model"),
                        ("truncated", r"is not a model transformers can load \(SafetensorError"),
                        ("no-tokenizer", r"its tokenizer has no vocabulary besides its 5 special tokens")):
        with pytest.raises(ModelError, match=rf"model\.name='{tmp_path / folder}' .*{why}"):
            load_encoder(ModelConfig(name=str(tmp_path / folder)))
    assert no_tokenizer.is_dir()


def test_unknown_architecture_lists_linear_layers(tmp_path):
    from transformers import OPTConfig, OPTModel

    from embedft_testing.synthetic import build_qwen_tokenizer

    tok = build_qwen_tokenizer(tmp_path)
    OPTModel(OPTConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       word_embed_proj_dim=16, max_position_embeddings=64)).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as e:
        load_encoder(ModelConfig(name=str(tmp_path)))
    msg = str(e.value)
    assert "'opt'" in msg and "q_proj" in msg and "lora.target_modules" in msg
    # Setting the family and targets by hand makes it work.
    enc = load_encoder(ModelConfig(name=str(tmp_path), family="decoder"), lora=LoraConfig(target_modules=("q_proj", "k_proj", "v_proj")))
    apply_lora(enc, LoraConfig(r=2, target_modules=("q_proj", "k_proj", "v_proj")))
    assert any("lora_A" in n for n, _ in enc.named_parameters())


def test_adapter_roundtrip_and_base_mismatch(tiny_bert_dir, tiny_qwen3_dir, tmp_path):
    torch.manual_seed(0)
    enc = apply_lora(load_encoder(ModelConfig(name=str(tiny_bert_dir))), LoraConfig(r=4))
    with torch.no_grad():  # make the adapter non-trivial (B starts at zero)
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    before = enc.encode(TEXTS)
    save_adapter(enc, tmp_path / "adapter")
    meta = read_adapter_meta(tmp_path / "adapter")
    assert meta["spec"]["family"] == "bert"
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    again = load_adapter(load_encoder(ModelConfig(name=str(tiny_bert_dir))), tmp_path / "adapter")
    assert np.abs(again.encode(TEXTS) - before).max() < 1e-6
    with pytest.raises(ModelError, match="trained on base model"):
        load_adapter(load_encoder(ModelConfig(name=str(tiny_qwen3_dir))), tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="missing adapter_model.safetensors"):
        read_adapter_meta(tmp_path / "adapter")
    (tmp_path / "adapter.txt").write_text("")
    with pytest.raises(ModelError, match="adapter.txt is a file, not a folder; pass the adapter/ folder"):
        read_adapter_meta(tmp_path / "adapter.txt")


def test_sdpa_backends_only_constrain_left_padding_on_cuda():
    import contextlib

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert isinstance(sdpa_backends(cpu, "left"), contextlib.nullcontext)
    assert isinstance(sdpa_backends(cuda, "right"), contextlib.nullcontext)
    assert not isinstance(sdpa_backends(cuda, "left"), contextlib.nullcontext)  # not entered: no GPU needed


@pytest.mark.parametrize("base, autocast", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_bf16_training_on_cpu_takes_the_math_attention_kernel(tiny_model_dir, base, autocast):
    # The CPU flash kernel's bf16 backward is several times slower than the math kernel's; fp32 keeps
    # the default choice, and so does any forward in eval mode (encoding: flash is the faster forward).
    enc = load_encoder(ModelConfig(name=str(tiny_model_dir)))
    enc.backbone.to(base)
    flash_enabled = []
    attn = next(m for n, m in enc.backbone.named_modules() if n.endswith("attention") or n.endswith("self_attn"))
    attn.register_forward_pre_hook(lambda m, a: flash_enabled.append(torch.backends.cuda.flash_sdp_enabled()))
    batch = enc.collate(enc.tokenize(["apple iphone", "bosch washer 9kg black"]), torch.device("cpu"))
    bf16 = base == torch.bfloat16 or autocast
    for training in (True, False):
        enc.train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            enc(**batch)
    assert flash_enabled == [not bf16, True]
    assert torch.backends.cuda.flash_sdp_enabled()  # put back after the call


def test_bf16_training_on_cpu_keeps_flash_attention_for_long_sequences(tiny_model_dir, monkeypatch):
    from embedft.modeling import encoder as models

    enc = load_encoder(ModelConfig(name=str(tiny_model_dir)))
    enc.backbone.to(torch.bfloat16)
    flash_enabled = []
    attn = next(m for n, m in enc.backbone.named_modules() if n.endswith("attention") or n.endswith("self_attn"))
    attn.register_forward_pre_hook(lambda m, a: flash_enabled.append(torch.backends.cuda.flash_sdp_enabled()))
    short, long = (enc.collate(enc.tokenize([t]), torch.device("cpu")) for t in ("apple", "apple iphone 8 plus " * 4))
    monkeypatch.setattr(models, "CPU_MATH_ATTENTION_MAX", short["input_ids"].shape[1] * enc.head_dim)
    enc.train()
    enc(**short)
    enc(**long)
    assert flash_enabled == [False, True]  # past length x head dim of the limit, flash's backward is the faster


def test_skipping_peft_input_casts_under_bf16_autocast_changes_nothing(tiny_model_dir):
    # The GPU path: frozen base weights in bf16, fp32 LoRA weights, bf16 autocast. peft copies each
    # adapted projection's input to fp32 first; autocast casts it back to bf16 for the matmul, so
    # skipping the copy (lora_input_casts) must give the same embeddings and LoRA gradients
    # (bit for bit without LoRA dropout; dropout's 1/(1-p) scaling rounds differently in bf16).
    from embedft.modeling.runtime import lora_input_casts

    enc = load_encoder(ModelConfig(name=str(tiny_model_dir)))
    enc.backbone.to(torch.bfloat16)
    apply_lora(enc, LoraConfig(r=4, dropout=0.0))
    with torch.no_grad():  # non-zero B, so the adapter's output is in the embeddings
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    enc.train()
    batch = enc.collate(enc.tokenize(TEXTS), "cpu")
    layers = [m for m in enc.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert len(layers) == 3 * enc.backbone.config.num_hidden_layers

    def run(casts: bool):
        torch.manual_seed(0)  # same dropout masks
        enc.zero_grad()
        with lora_input_casts(enc, enabled=casts):
            assert all(m.cast_input_dtype_enabled == casts for m in layers)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                emb = enc(**batch)
            emb.pow(3).sum().backward()
        return emb.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.requires_grad}

    emb_cast, grads_cast = run(True)
    emb_skip, grads_skip = run(False)
    assert all(m.cast_input_dtype_enabled for m in layers)  # restored on exit
    torch.testing.assert_close(emb_skip, emb_cast, rtol=0, atol=0)
    assert grads_skip.keys() == grads_cast.keys() and grads_cast
    for n in grads_cast:
        assert grads_cast[n].abs().sum() > 0, n
        torch.testing.assert_close(grads_skip[n], grads_cast[n], rtol=0, atol=0, msg=n)


def test_bf16_encode_precision_swaps_weights_and_restores_them_exactly(tiny_model_dir):
    from embedft.modeling.runtime import encode_precision

    enc = load_encoder(ModelConfig(name=str(tiny_model_dir)))
    apply_lora(enc, LoraConfig(r=4, dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter: its output is in the embeddings
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    with encode_precision(enc, "fp32") as amp:
        assert amp is False
        fp32 = enc.encode(TEXTS, amp=amp)
    with encode_precision(enc, "bf16") as amp:
        assert amp is None  # autocast on CUDA only, over the bf16 weights
        assert all(p.dtype == torch.bfloat16 for p in enc.parameters())
        bf16 = enc.encode(TEXTS, amp=amp)
    # The fp32 weights come back bit for bit (not a round trip through bf16), requires_grad too.
    for n, p in enc.named_parameters():
        assert p.dtype == torch.float32, n
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0, msg=n)
    assert sum(p.requires_grad for p in enc.parameters()) == sum("lora_" in n for n in before)
    # bf16 rounds: not the same vectors, but the same directions.
    assert np.abs(bf16 - fp32).max() > 0
    assert (bf16 * fp32).sum(axis=1).min() > 0.99
    np.testing.assert_array_equal(enc.encode(TEXTS, amp=False), fp32)


def test_encode_precision_restores_the_weights_when_encoding_fails(tiny_bert_dir):
    from embedft.modeling.runtime import encode_precision

    enc = load_encoder(ModelConfig(name=str(tiny_bert_dir)))
    with pytest.raises(RuntimeError, match="boom"):
        with encode_precision(enc, "bf16"):
            raise RuntimeError("boom")
    assert all(p.dtype == torch.float32 for p in enc.parameters())


def test_load_encoder_caps_onednns_primitive_cache_unless_the_user_set_it(tiny_bert_dir, monkeypatch):
    from embedft.modeling.runtime import ONEDNN_PRIMITIVE_CACHE_CAPACITY

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    load_encoder(ModelConfig(name=str(tiny_bert_dir)))
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == ONEDNN_PRIMITIVE_CACHE_CAPACITY
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024")
    load_encoder(ModelConfig(name=str(tiny_bert_dir)))
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "1024"


def test_cuda_device_the_machine_lacks_is_a_config_error(monkeypatch):
    from embedft.errors import ConfigError
    from embedft.modeling.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.device=cuda but no CUDA device is available"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"train.device=cuda:1 but this machine has 1 CUDA device"):
        resolve_device("cuda:1")  # numbered from 0: the one device is cuda:0
    with pytest.raises(ConfigError, match=r"train.device=cuda:3 but this machine has 1 CUDA device"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=r"^train.device=gpu: unknown device; use -o train.device=auto"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match=r"^--device cuda:3 but this machine has 1 CUDA device.*use --device cuda$"):
        resolve_device("cuda:3", "--device")  # a command-line option is named as one


def test_pool_by_hand_under_right_and_left_padding():
    from embedft.modeling.encoder import pool

    # hidden[b, t] = (10b + t, -(10b + t)): every pooled value says which tokens it came from.
    v = 10 * torch.arange(3.0)[:, None] + torch.arange(4.0)[None, :]  # (3, 4)
    hidden = torch.stack([v, -v], dim=-1)  # (B=3, L=4, H=2)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    for mask, mean, cls, last in ((right, [0.5, 11.0, 21.5], [0.0, 10.0, 20.0], [1.0, 12.0, 23.0]),
                                  (left, [2.5, 12.0, 21.5], None, [3.0, 13.0, 23.0])):
        for mode, want in (("mean", mean), ("cls", cls), ("lasttoken", last)):
            if want is not None:  # cls reads position 0: a right-padding (BERT) pooling only
                assert pool(hidden, mask, mode).tolist() == [[w, -w] for w in want], (mode, mask)
    with pytest.raises(ModelError, match="unknown pooling 'max'"):
        pool(hidden, right, "max")


def test_pooling_setting_wins_and_a_saved_sentence_transformers_config_is_read(tiny_bert_dir, tmp_path):
    import shutil

    from embedft.export.merge import to_sentence_transformer

    enc = load_encoder(ModelConfig(name=str(tiny_bert_dir), pooling="cls"))
    assert enc.spec.pooling == "cls"
    enc.eval()
    batch = enc.collate(enc.tokenize(TEXTS))
    with torch.no_grad():
        hidden = enc.backbone(**batch).last_hidden_state
        torch.testing.assert_close(enc(**batch), torch.nn.functional.normalize(hidden[:, 0], dim=-1))
    # A sentence-transformers folder whose Pooling is cls and whose query prompt is "query: " (as E5 has).
    st_dir = shutil.copytree(tiny_bert_dir, tmp_path / "st")
    to_sentence_transformer(enc, "query: ").save(str(st_dir))
    saved = load_encoder(ModelConfig(name=str(st_dir)))
    assert (saved.spec.pooling, saved.spec.query_template) == ("cls", "query: {text}")
    assert saved.format(["tv"], is_query=True) == ["query: tv"] and saved.format(["tv"], is_query=False) == ["tv"]
    assert load_encoder(ModelConfig(name=str(st_dir), pooling="mean")).spec.pooling == "mean"  # the setting wins


def test_max_length_is_capped_at_the_models_positions(tiny_bert_dir):
    enc = load_encoder(ModelConfig(name=str(tiny_bert_dir), max_length=1000))
    assert enc.spec.max_length == enc.backbone.config.max_position_embeddings == 128
    ids = enc.tokenize(["word " * 400])
    assert len(ids[0]) == 128
    with torch.no_grad():
        assert enc(**enc.collate(ids)).shape == (1, 32)  # beyond 128 positions BERT has no embedding


def test_family_setting_decides_padding_pooling_and_prompt(tiny_bert_dir, tiny_qwen3_dir):
    as_decoder = load_encoder(ModelConfig(name=str(tiny_bert_dir), family="decoder", task="t"))
    spec = as_decoder.spec
    assert (spec.family, spec.padding_side, spec.pooling) == ("decoder", "left", "lasttoken")
    assert spec.query_template == "Instruct: t\nQuery:{text}"
    as_bert = load_encoder(ModelConfig(name=str(tiny_qwen3_dir), family="bert"))
    spec = as_bert.spec
    assert (spec.family, spec.padding_side, spec.pooling, spec.query_template) == ("bert", "right", "mean", None)
    apply_lora(as_bert, LoraConfig(r=2))  # the model type's own Q/K/V names are kept
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in as_bert.named_parameters() if "lora_A" in n} == \
        {"q_proj", "k_proj", "v_proj"}


def test_a_tokenizer_that_appends_its_own_end_token_is_left_as_it_is(tiny_qwen3_dir):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from embedft.modeling.tokenizer import ensure_eos_appended

    # Qwen3-Embedding's tokenizer appends <|endoftext|> (its pad), not its eos token <|im_end|>.
    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    end = tok.pad_token
    tok._tokenizer.post_processor = TemplateProcessing(single=f"$A {end}", special_tokens=[(end, tok.pad_token_id)])
    before = tok(["apple tv", "a"])["input_ids"]
    ensure_eos_appended(tok)
    assert tok(["apple tv", "a"])["input_ids"] == before
    assert all(ids[-1] == tok.pad_token_id and tok.eos_token_id not in ids for ids in before)
    plain = AutoTokenizer.from_pretrained(tiny_qwen3_dir)  # appends nothing: EOS is added, once
    ensure_eos_appended(plain)
    assert plain(["apple tv", "a"])["input_ids"] == [ids[:-1] + [plain.eos_token_id] for ids in before]


def test_lora_update_is_b_a_times_alpha_over_r_as_configured(tiny_bert_dir, tmp_path):
    from embedft.modeling.lora import lora_settings

    torch.manual_seed(0)
    enc = apply_lora(load_encoder(ModelConfig(name=str(tiny_bert_dir))), LoraConfig(r=4, alpha=12, dropout=0.1))
    enc.eval()  # no dropout: the layer's output is its weights'
    layer = next(m for n, m in enc.backbone.named_modules() if n.endswith("layer.0.attention.self.query"))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
        x = torch.randn(3, 32)
        W, b = layer.base_layer.weight, layer.base_layer.bias
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
        torch.testing.assert_close(layer(x), x @ (W + (12 / 4) * B @ A).T + b)
    assert lora_settings(enc) == {"r": 4, "alpha": 12, "dropout": 0.1, "target_modules": ["key", "query", "value"]}
    saved = json.loads((save_adapter(enc, tmp_path / "adapter") / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (4, 12, 0.1)
