"""The training loop on tiny random models: it learns, resumes exactly, and its memory
savers (cached negatives, gradient checkpointing) give the same gradients."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from embedft.config import LoraConfig, LossConfig, ModelConfig, TrainConfig
from embedft.data.batches import build_pair_source, epoch_batches
from embedft.data.examples import Examples
from embedft.modeling.builders import build_encoder
from embedft.modeling.encoder import load_encoder
from embedft.modeling.lora import apply_lora
from embedft.training.loop import base_dropout, train
from embedft.training.losses import batch_loss
from embedft.training.step import embed, train_step_cached
from embedft.training.tokens import TokenCache, batch_sequences

WORDS = ["apple", "samsung", "sony", "bosch", "intel", "canon", "nikon", "miele", "lg", "amd", "pixel", "galaxy"]


def toy_examples(n_groups: int = 12, per_group: int = 4) -> Examples:
    """Groups of texts sharing a distinctive word pair: learnable, not trivial for a random model."""
    rng = np.random.default_rng(0)
    texts, groups = [], []
    for g in range(n_groups):
        key = f"{WORDS[g % len(WORDS)]} {WORDS[(g * 5 + 3) % len(WORDS)]} {g}"
        for j in range(per_group):
            filler = " ".join(rng.choice(["tv", "phone", "black", "white", "pro", "max", "mini"], size=3))
            texts.append(f"{filler} {key} {j}")
            groups.append(str(g))
    return Examples("grouped", "toy", np.arange(len(texts)) + 1, texts, groups=groups, labels=None)


def _encoder(path, dropout=0.0, base_dtype=torch.float32, device="cpu", **model_kw):
    torch.manual_seed(0)
    return build_encoder(ModelConfig(name=str(path), **model_kw), device, LoraConfig(r=4, alpha=8, dropout=dropout),
                         base_dtype)


def _loss_on(enc, src, cache, loss_cfg, n_batches=3, bs=8, sampling="random"):
    with torch.no_grad():
        enc.eval()
        vals = []
        for i, b in enumerate(epoch_batches(src, bs, seed=123, epoch=0, sampling=sampling)):
            if i >= n_batches:
                break
            seqs, gather = batch_sequences(b, cache)
            vals.append(float(batch_loss(embed(enc, seqs, torch.device("cpu"), False, chunk=64), b, gather, src.text_keys, loss_cfg)))
        enc.train()
    return float(np.mean(vals))


def _count_tokenized(enc) -> list[int]:
    # How many texts each tokenizer call of the encoder got.
    calls, real = [], enc.tokenize
    enc.tokenize = lambda texts, is_query=False: calls.append(len(texts)) or real(texts, is_query)
    return calls


def test_token_cache_tokenizes_each_text_once_when_first_needed(tiny_model_dir):
    enc = _encoder(tiny_model_dir)
    texts = toy_examples().texts
    cache = TokenCache(enc, texts)
    calls = _count_tokenized(enc)
    assert calls == []  # nothing up front
    idx = np.array([5, 1, 5, 9])
    assert cache.queries(idx) == enc.tokenize([texts[i] for i in idx], is_query=True)
    assert cache.docs(idx) == enc.tokenize([texts[i] for i in idx])
    calls.clear()
    assert cache.queries([1, 9]) + cache.docs([9, 5]) == [cache.queries([1])[0], cache.queries([9])[0],
                                                           cache.docs([9])[0], cache.docs([5])[0]]
    assert calls == []  # kept: asked again, tokenized never
    cache.docs([9, 2, 2])
    assert calls == [1]  # only the new text, once
    # A decoder's queries carry the instruction, so they are a second form; a BERT's are its documents.
    assert cache.two_forms == (enc.spec.family == "decoder")
    assert (cache.queries([3]) != cache.docs([3])) == cache.two_forms


def test_a_run_shorter_than_an_epoch_tokenizes_only_its_batches(tiny_model_dir, tmp_path):
    enc = _encoder(tiny_model_dir)
    src = build_pair_source(toy_examples())
    calls = _count_tokenized(enc)
    train(enc, src, TrainConfig(epochs=1, max_steps=1, batch_size=8, warmup_ratio=0.0), LossConfig(), tmp_path,
          progress=False)
    forms = 2 if enc.spec.family == "decoder" else 1
    assert 0 < sum(calls) <= 2 * 8 * forms < len(src.texts) * forms  # one batch's anchors and positives


def test_a_few_steps_lower_the_loss(tiny_model_dir, tmp_path):
    enc = _encoder(tiny_model_dir)
    src = build_pair_source(toy_examples())
    loss_cfg = LossConfig(temperature=0.1)
    cache = TokenCache(enc, src.texts)
    before = _loss_on(enc, src, cache, loss_cfg)
    res = train(enc, src, TrainConfig(epochs=10, batch_size=8, lr=3e-2, warmup_ratio=0.0, log_every=1), loss_cfg,
                tmp_path, progress=False)
    after = _loss_on(enc, src, cache, loss_cfg)
    assert res.steps == 10 * (48 // 8)
    assert after < 0.7 * before, (before, after)
    assert (tmp_path / "checkpoint" / "state.pt").is_file()


def test_the_log_line_gives_the_rate_since_the_last_line_and_the_run_average(tiny_model_dir, tmp_path, monkeypatch,
                                                                             caplog):
    import types

    import embedft.training.loop as loop

    clock = {"t": 0.0, "calls": 0}

    def perf_counter():  # the loop reads it at each step's start and end: step k takes k seconds
        clock["calls"] += 1
        if clock["calls"] % 2 == 0:
            clock["t"] += clock["calls"] // 2
        return clock["t"]

    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=perf_counter))
    enc = _encoder(tiny_model_dir)
    src = build_pair_source(toy_examples())
    with caplog.at_level("INFO", logger="embedft.training.loop"):
        train(enc, src, TrainConfig(epochs=1, batch_size=8, warmup_ratio=0.0, log_every=2), LossConfig(), tmp_path,
              progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    # 8 anchors a step: steps 3-4 took 3 + 4 s (16 / 7 = 2.3 a second), steps 1-4 took 10 s (32 / 10)
    assert [ln.split(" lr=")[1].split(" ", 1)[1] for ln in lines] == [
        "samples/s=5.3 (run average 5.3)", "samples/s=2.3 (run average 3.2)", "samples/s=1.5 (run average 2.3)"]


def test_similar_group_batches_lower_the_loss(tiny_model_dir, tmp_path):
    enc = _encoder(tiny_model_dir)
    src = build_pair_source(toy_examples())
    loss_cfg = LossConfig(temperature=0.1)
    cache = TokenCache(enc, src.texts)
    before = _loss_on(enc, src, cache, loss_cfg, bs=12, sampling="groups")
    cfg = TrainConfig(epochs=10, batch_size=12, lr=3e-2, warmup_ratio=0.0, log_every=1, batch_sampling="similar_groups")
    res = train(enc, src, cfg, loss_cfg, tmp_path, progress=False)
    after = _loss_on(enc, src, cache, loss_cfg, bs=12, sampling="groups")
    assert res.steps == 10 * (48 // 12)  # 12 groups x 4 texts (group_size 4) per epoch
    assert after < 0.7 * before, (before, after)


def _adapter(enc):
    return {k: v.detach().clone() for k, v in enc.named_parameters() if v.requires_grad}


# 6 steps an epoch. Every 4 steps: checkpoints at step 4 (epoch 1, 4 of its batches done), 6 (end
# of epoch 1), 8 (epoch 2, 2 done), 12 (epoch 2, all 6 done, then its end), 16, 18.
@pytest.mark.parametrize("every, kill_at, at", [(None, 1, (6, 1, 0)), (4, 1, (4, 0, 4)), (4, 3, (8, 1, 2)),
                                                (4, 4, (12, 1, 6))])
def test_resume_after_kill_matches_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch, every, kill_at, at):
    src = build_pair_source(toy_examples())
    cfg = TrainConfig(epochs=3, batch_size=8, lr=3e-3, warmup_steps=2, scheduler="cosine", log_every=1)
    loss_cfg = LossConfig(temperature=0.1, symmetric=True)

    full = _encoder(tiny_model_dir, dropout=0.1)  # dropout on: the RNG state must be restored too
    train(full, src, cfg, loss_cfg, tmp_path / "full", progress=False)

    import embedft.training.loop as T

    real_save = T.save_checkpoint
    saves = []

    def save_then_die(path, *a, **k):
        real_save(path, *a, **k)
        saves.append(1)
        if len(saves) == kill_at:
            raise KeyboardInterrupt  # killed right after this checkpoint

    killed = _encoder(tiny_model_dir, dropout=0.1)
    monkeypatch.setattr(T, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(killed, src, replace(cfg, checkpoint_every=every), loss_cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    progress = json.loads((tmp_path / "resumed" / "checkpoint" / "progress.json").read_text())
    assert (progress["step"], progress["epoch"], progress["batches_done"]) == at

    resumed = _encoder(tiny_model_dir, dropout=0.1)  # a fresh process: fresh weights, state from disk
    res = train(resumed, src, cfg, loss_cfg, tmp_path / "resumed", resume=True, progress=False)
    assert res.steps == 3 * 6 and res.epochs_done == 3
    assert [h["step"] for h in res.history] == list(range(1, 19))  # no step lost or done twice
    a, b = _adapter(full), _adapter(resumed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_resume_without_checkpoint_is_a_clear_error(tiny_bert_dir, tmp_path):
    enc = _encoder(tiny_bert_dir)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(enc, build_pair_source(toy_examples()), TrainConfig(batch_size=8), LossConfig(), tmp_path,
              resume=True, progress=False)


def test_resume_with_other_settings_is_refused_naming_them(tiny_bert_dir, tmp_path):
    import json

    from embedft.errors import ConfigError

    src = build_pair_source(toy_examples())
    cfg = TrainConfig(epochs=1, max_steps=2, batch_size=8, eval_every_epoch=False)
    train(_encoder(tiny_bert_dir), src, cfg, LossConfig(), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"train.lr: 0.001 there, 0.0002 now"):
        train(_encoder(tiny_bert_dir), src, TrainConfig(**{**cfg.__dict__, "lr": 2e-4}), LossConfig(), tmp_path,
              resume=True, progress=False)
    wider = apply_lora(load_encoder(ModelConfig(name=str(tiny_bert_dir))), LoraConfig(r=8, alpha=8))
    with pytest.raises(ConfigError, match=r"lora.r: 4 there, 8 now"):
        train(wider, src, cfg, LossConfig(), tmp_path, resume=True, progress=False)
    # Other training data (another split, max_train_rows) or another max_length trains something else.
    fewer = build_pair_source(toy_examples(n_groups=11))
    with pytest.raises(ConfigError, match=r"other settings \(training data digest: '[0-9a-f]+' there, '[0-9a-f]+' now\)"):
        train(_encoder(tiny_bert_dir), fewer, cfg, LossConfig(), tmp_path, resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"model.max_length: 128 there, 16 now"):
        train(_encoder(tiny_bert_dir, max_length=16), src, cfg, LossConfig(), tmp_path, resume=True, progress=False)
    # Settings that do not change what is trained may differ.
    res = train(_encoder(tiny_bert_dir), src, TrainConfig(**{**cfg.__dict__, "log_every": 1}), LossConfig(), tmp_path,
                resume=True, progress=False)
    assert res.steps == 2
    # A checkpoint without the settings (older embedft) is still checked by its tensor shapes.
    progress = tmp_path / "checkpoint" / "progress.json"
    progress.write_text(json.dumps({**json.loads(progress.read_text()), "identity": None}))
    with pytest.raises(ConfigError, match=r"has shape \(4, 32\) there, \(8, 32\) now"):
        train(wider, src, cfg, LossConfig(), tmp_path, resume=True, progress=False)
    # A checkpoint damaged after it was written (it is swapped in whole) is a clear error, not a traceback.
    state = tmp_path / "checkpoint" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=r"the checkpoint in .*checkpoint is damaged \(RuntimeError: .*start fresh"):
        train(_encoder(tiny_bert_dir), src, cfg, LossConfig(), tmp_path, resume=True, progress=False)
    progress.write_text('{"epoch": 1, "st')
    with pytest.raises(ConfigError, match=r"is damaged \(JSONDecodeError: .*start fresh without --resume"):
        train(_encoder(tiny_bert_dir), src, cfg, LossConfig(), tmp_path, resume=True, progress=False)


def _grads(enc):
    return {k: v.grad.detach().clone() for k, v in enc.named_parameters() if v.requires_grad}


def _one_batch(src, bs=16, sampling="random"):
    return next(epoch_batches(src, bs, seed=1, epoch=0, sampling=sampling))


@pytest.mark.parametrize("sampling", ["random", "groups"])
def test_cached_negatives_match_full_batch(tiny_model_dir, sampling, device):
    src = build_pair_source(toy_examples())
    loss_cfg = LossConfig(temperature=0.05, symmetric=True)
    batch = _one_batch(src, sampling=sampling)
    results = []
    for mini in (None, 5):
        enc = _encoder(tiny_model_dir, device=device)
        cache = TokenCache(enc, src.texts)
        seqs, gather = batch_sequences(batch, cache)
        loss_of = lambda e: batch_loss(e, batch, gather, src.text_keys, loss_cfg)  # noqa: E731
        if mini is None:
            loss_t = loss_of(embed(enc, seqs, device, False, chunk=64))
            loss_t.backward()
            loss = float(loss_t.detach())
        else:
            loss = train_step_cached(enc, seqs, loss_of, device, mini, False)
        results.append((loss, _grads(enc)))
    (l_full, g_full), (l_cached, g_cached) = results
    assert abs(l_full - l_cached) <= 1e-5
    assert sum(g.abs().sum().item() for g in g_full.values()) > 0
    assert max((g_full[k] - g_cached[k]).abs().max().item() for k in g_full) <= 1e-5


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, device, base_dtype):
    # bf16 on the CPU: the forward takes the math attention kernel; the recompute in the backward must
    # too (torch's default there, flash, saved other tensors: a CheckpointError).
    src = build_pair_source(toy_examples())
    batch = _one_batch(src)
    grads, calls = [], []
    for ckpt in (False, True):
        enc = _encoder(tiny_model_dir, device=device, gradient_checkpointing=ckpt, base_dtype=base_dtype)
        enc.train()
        layer = max((m for m in enc.modules() if isinstance(m, torch.nn.ModuleList)), key=len)[0]
        inner = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))  # one of the layer's matmuls
        inner.register_forward_hook(lambda *a: calls.append(ckpt))
        seqs, gather = batch_sequences(batch, TokenCache(enc, src.texts))
        batch_loss(embed(enc, seqs, device, False, chunk=64), batch, gather, src.text_keys, LossConfig()).backward()
        grads.append(_grads(enc))
    plain, ckpt = grads
    # Checkpointed layers run their forward again in the backward pass; that is what saves the memory.
    assert calls.count(True) == 2 * calls.count(False) > 0
    # Non-zero on every LoRA matrix that feeds the output (no silently detached graph).
    # (lora_A has zero gradient at init because lora_B starts at zero; lora_B must not.)
    assert all(g.abs().sum() > 0 for k, g in ckpt.items() if "lora_B" in k)
    assert max((plain[k] - ckpt[k]).abs().max().item() for k in plain) <= 1e-5


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones(tiny_model_dir, tmp_path):
    # train.compile: the same losses and the same adapter after a few steps (fp32, CPU inductor).
    src = build_pair_source(toy_examples())
    runs = []
    for compiled in (False, True):
        enc = _encoder(tiny_model_dir)
        cfg = TrainConfig(epochs=1, max_steps=3, batch_size=8, lr=3e-2, warmup_ratio=0.0, log_every=1,
                          eval_every_epoch=False, compile=compiled)
        res = train(enc, src, cfg, LossConfig(temperature=0.1), tmp_path / str(compiled), progress=False)
        layers = [m for m in enc.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        assert len(layers) == (enc.backbone.config.num_hidden_layers if compiled else 0)
        runs.append(([h["train/loss"] for h in res.history],
                     {n: p.detach().clone() for n, p in enc.named_parameters() if p.requires_grad}))
    (eager_losses, eager_w), (comp_losses, comp_w) = runs
    assert comp_losses == pytest.approx(eager_losses, abs=1e-5)
    assert eager_w.keys() == comp_w.keys()
    for n in eager_w:
        torch.testing.assert_close(comp_w[n], eager_w[n], rtol=1e-4, atol=1e-5, msg=n)


def test_batch_larger_than_data_is_rejected(tiny_bert_dir, tmp_path):
    enc = _encoder(tiny_bert_dir)
    with pytest.raises(ValueError, match="train.batch_size=64 is larger than the 48"):
        train(enc, build_pair_source(toy_examples()), TrainConfig(batch_size=64), LossConfig(), tmp_path, progress=False)


def test_auto_base_dtype_follows_the_device_and_the_cpus_bf16(tmp_path, monkeypatch):
    import embedft.modeling.runtime as T

    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(T, "CPUINFO", cpuinfo)
    cpu = torch.device("cpu")
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert T.base_dtype("auto", cpu) == torch.float32 and T.base_dtype("bf16", cpu) == torch.bfloat16
    for flag in ("avx512_bf16", "amx_bf16"):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse avx2 avx512f {flag} avx512_vnni\n")
        assert T.base_dtype("auto", cpu) == torch.bfloat16 and T.base_dtype("fp32", cpu) == torch.float32
    cpuinfo.unlink()  # no /proc/cpuinfo (not Linux): fp32
    assert T.base_dtype("auto", cpu) == torch.float32
    assert T.base_dtype("auto", torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_base_trains_under_cpu_autocast_without_fp32_input_copies(tiny_model_dir, tmp_path, dtype):
    # With bf16 base weights, peft would copy each adapted projection's bf16 input to fp32 for
    # the fp32 adapter and keep the copy for the backward; under bf16 autocast the adapter runs
    # in bf16 on the input itself (fp32 master weights), the CUDA path's arithmetic.
    enc = _encoder(tiny_model_dir, base_dtype=dtype)
    seen = []
    layer = next(m for m in enc.modules() if hasattr(m, "cast_input_dtype_enabled"))
    layer.register_forward_pre_hook(
        lambda m, args: seen.append((torch.is_autocast_enabled("cpu"), m.cast_input_dtype_enabled)))
    before = {n: p.detach().clone() for n, p in enc.named_parameters() if p.requires_grad}
    res = train(enc, build_pair_source(toy_examples()), TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_ratio=0.0),
                LossConfig(temperature=0.1), tmp_path, progress=False)
    bf16 = dtype == torch.bfloat16
    assert seen and set(seen) == {(bf16, not bf16)}
    assert res.steps == 6 and np.isfinite(res.history[-1]["train/loss"])
    for n, p in enc.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and not torch.equal(p, before[n]), n


def _dropout_layers(enc):
    return {name: m for name, m in enc.named_modules() if isinstance(m, torch.nn.Dropout)}


def test_base_dropout_off_leaves_only_the_lora_dropout_and_puts_the_models_back(tmp_path):
    from embedft_testing.synthetic import tiny_bert

    enc = _encoder(tiny_bert(tmp_path / "m", dropout=0.3), dropout=0.2)
    layers = _dropout_layers(enc)
    base = {n for n in layers if "lora_" not in n}
    assert base and len(layers) > len(base)  # the model's own dropout layers and LoRA's
    batch = enc.collate(enc.tokenize(["apple iphone 8 plus", "bosch washing machine 9kg"]), torch.device("cpu"))
    enc.eval()
    with torch.no_grad():
        ref = enc(**batch)
    enc.train()
    with base_dropout(enc, enabled=False) as n_off, torch.no_grad():
        assert n_off == len(base)
        assert all(layers[n].p == 0.0 for n in base) and all(layers[n].p == 0.2 for n in set(layers) - base)
        for n in set(layers) - base:  # LoRA's dropout off too, to see that nothing of the model drops out
            layers[n].eval()
        torch.testing.assert_close(enc(**batch), ref)  # training mode, yet the model's forward is eval's
        enc.train()
    assert all(layers[n].p == 0.3 for n in base)  # put back
    with torch.no_grad():
        assert not torch.allclose(enc(**batch), ref)  # the model's dropout is on again
    with base_dropout(enc, enabled=True) as n_off:
        assert n_off == 0 and all(layers[n].p == 0.3 for n in base)


@pytest.mark.parametrize("keep", [True, False])
def test_train_runs_with_or_without_the_base_models_dropout(tmp_path, keep):
    from embedft_testing.synthetic import tiny_bert

    enc = _encoder(tiny_bert(tmp_path / "m", dropout=0.3))
    layer = next(m for n, m in _dropout_layers(enc).items() if "lora_" not in n)
    seen = []
    layer.register_forward_hook(lambda m, args, out: seen.append(m.p) if m.training else None)
    train(enc, build_pair_source(toy_examples()), TrainConfig(epochs=1, max_steps=2, batch_size=8, warmup_ratio=0.0,
                                                               eval_every_epoch=False, base_dropout=keep),
          LossConfig(), tmp_path / "run", progress=False)
    assert seen and set(seen) == {0.3 if keep else 0.0}  # every training forward
    assert layer.p == 0.3  # the model as it was, for the evaluation and export after training


class _IdCache:
    """A stand-in TokenCache: text id i 'tokenizes' to [i], one form for queries and documents."""

    two_forms = False

    def queries(self, ids):
        return [[int(i)] for i in ids]

    docs = queries


@pytest.mark.parametrize("symmetric", [False, True])
def test_pair_batch_loss_masks_other_positives_of_the_same_query(symmetric):
    from embedft.data.batches import Batch

    # q0 has two positives (p0, p1): in one batch, neither is a negative for the other's row.
    rows = [("q0", "p0"), ("q0", "p1"), ("q2", "p2"), ("q3", "p3")]
    ex = Examples("pairs", "mem", np.arange(4) + 2, [r[0] for r in rows], positives=[r[1] for r in rows])
    src = build_pair_source(ex)
    batch = Batch(src.anchors, src.positives, None, src.anchor_keys)
    seqs, gather = batch_sequences(batch, _IdCache())
    g = torch.Generator().manual_seed(0)
    vec = torch.nn.functional.normalize(torch.randn(len(src.texts), 8, generator=g, dtype=torch.float64), dim=1)
    emb = vec[[s[0] for s in seqs]]  # (unique sequences, D): one vector per text id
    t = 0.1
    got = batch_loss(emb, batch, gather, src.text_keys, LossConfig(temperature=t, symmetric=symmetric))

    def ref(rows_ids, cols_ids, rows_keys, cols_keys):
        s = vec[rows_ids] @ vec[cols_ids].T / t
        out = []
        for i in range(len(rows_ids)):
            keep = [j for j in range(len(cols_ids)) if j == i or (rows_keys[i] != cols_keys[j]
                                                                   and rows_ids[i] != cols_ids[j])]
            out.append(-s[i, i] + torch.logsumexp(s[i, keep], 0))
        return torch.stack(out).mean()

    a, p = src.anchors.tolist(), src.positives.tolist()
    keys_a, keys_p = src.anchor_keys.tolist(), src.text_keys[src.positives].tolist()
    want = ref(a, p, keys_a, keys_p)
    if symmetric:
        want = 0.5 * (want + ref(p, a, keys_p, keys_a))
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


def test_lr_schedule_by_hand():
    from embedft.training.loop import lr_lambda

    # LambdaLR gives step s (0-based) the peak lr times f(s). Warmup 2 of 10 steps, then decay to 0.
    f = lr_lambda(10, 2, "linear")
    assert [f(s) for s in range(12)] == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125,
                                                       0.0, 0.0])
    f = lr_lambda(10, 2, "cosine")
    assert [f(s) for s in range(11)] == pytest.approx([0.5, 1.0, 1.0, 0.96194, 0.85355, 0.69134, 0.5, 0.30866,
                                                       0.14645, 0.03806, 0.0], abs=1e-5)
    f = lr_lambda(10, 2, "constant")
    assert [f(s) for s in range(11)] == [0.5] + [1.0] * 10
    f = lr_lambda(4, 0, "linear")  # no warmup: the first step at the peak
    assert [f(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_each_step_uses_the_scheduled_lr_and_clipped_gradients(tiny_bert_dir, tmp_path, monkeypatch):
    import embedft.training.loop as T

    seen = []  # per optimizer step: lr, weight decay and the norm of the gradients it applies

    def make_optimizer(*a, **k):
        opt = real(*a, **k)
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append((
            o.param_groups[0]["lr"], o.param_groups[0]["weight_decay"],
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in o.param_groups[0]["params"]])).item())))
        return opt

    real = T.make_optimizer
    monkeypatch.setattr(T, "make_optimizer", make_optimizer)
    enc = _encoder(tiny_bert_dir)
    cfg = TrainConfig(epochs=1, max_steps=4, batch_size=8, lr=1e-2, weight_decay=0.05, warmup_ratio=0.5,
                      max_grad_norm=1e-3, log_every=1, eval_every_epoch=False)
    res = train(enc, build_pair_source(toy_examples()), cfg, LossConfig(), tmp_path, progress=False)
    # 4 steps, warmup int(0.5 * 4) = 2: 0.5, 1 of the peak, then linear decay from 1 over the last 2.
    assert [s[0] for s in seen] == pytest.approx([5e-3, 1e-2, 1e-2, 5e-3])
    assert [h["train/lr"] for h in res.history] == pytest.approx([1e-2, 1e-2, 5e-3, 0.0])  # after each step
    assert {s[1] for s in seen} == {0.05}
    # The logged norm is before clipping; the optimizer gets gradients clipped to max_grad_norm.
    assert all(h["train/grad_norm"] > 1e-3 for h in res.history)
    assert [s[2] for s in seen] == pytest.approx([1e-3] * 4, rel=1e-4)
    assert all(p.grad is None for p in enc.parameters())  # nothing carried over into a next step


def test_cached_negatives_replay_each_chunks_dropout(tiny_bert_dir):
    # With LoRA dropout on, the backward pass of each chunk must drop what its first pass dropped:
    # the same as one graph through the same chunks, from the same RNG state.
    from embedft.modeling.chunking import call_overhead, length_chunks

    src = build_pair_source(toy_examples())
    batch = _one_batch(src)
    cpu = torch.device("cpu")
    results = []
    for cached in (False, True):
        enc = _encoder(tiny_bert_dir, dropout=0.3)
        enc.train()
        seqs, gather = batch_sequences(batch, TokenCache(enc, src.texts))
        loss_of = lambda e: batch_loss(e, batch, gather, src.text_keys, LossConfig(temperature=0.05))  # noqa: E731
        torch.manual_seed(7)
        if cached:
            loss = train_step_cached(enc, seqs, loss_of, cpu, 5, False)
        else:
            chunks = length_chunks([len(s) for s in seqs], 5, call_overhead(cpu))
            assert len(chunks) > 1
            emb = torch.cat([enc(**enc.collate([seqs[i] for i in idx])) for idx in chunks])
            loss_t = loss_of(emb[np.argsort(np.concatenate(chunks))])
            loss_t.backward()
            loss = loss_t.item()
        results.append((loss, _grads(enc)))
    (l_ref, g_ref), (l_cached, g_cached) = results
    assert l_cached == pytest.approx(l_ref, abs=1e-6)
    assert max((g_ref[k] - g_cached[k]).abs().max().item() for k in g_ref) <= 1e-6
