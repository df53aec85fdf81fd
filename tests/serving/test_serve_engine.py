"""The batching engine without HTTP: mixed-adapter forward passes, hot load/unload, bounds and bad input."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from embedft.errors import ModelError
from embedft.serving.errors import BadRequest, Conflict, NotFound, Overloaded, TooLarge
from serving.serve_helpers import FAMILIES, TEXTS, assert_close, engine_for, make_adapter


@pytest.mark.parametrize("fam", FAMILIES)
def test_one_forward_pass_mixing_three_adapters_and_the_base_gives_each_row_its_own_vector(family_models, fam):
    fm = family_models[fam]
    engine = engine_for(fm, max_wait_ms=0)
    # Queued before the worker starts, so its first batch holds them all.
    futures = {(m, kind): engine.submit(m, TEXTS, kind) for m in ("a3", "base", "a1", "a2") for kind in ("document", "query")}
    with engine:
        results = {k: f.result(60) for k, f in futures.items()}
    assert engine.metrics.value("batch_rows") == 1  # one forward pass ...
    assert engine.metrics.value("batch_models", sum=True) == 4  # ... over the three adapters and the base
    assert engine.metrics.value("batch_rows", sum=True) == 8 * len(TEXTS)
    for (m, kind), res in results.items():
        assert res.model == m
        assert_close(res.vectors, fm["refs"][m][kind])
        assert res.prompt_tokens == sum(len(x) for x in engine._tokenize(TEXTS, engine._models[m].profile,
                                                                          kind == "query"))
    # Not vacuous: every served model embeds differently from every other.
    names = ["base", "a1", "a2", "a3"]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(fm["refs"][a]["document"] - fm["refs"][b]["document"]).max() > 1e-2
    if fam == "qwen3":  # the decoder family's queries carry its instruction
        assert np.abs(fm["refs"]["a1"]["query"] - fm["refs"]["a1"]["document"]).max() > 1e-2


def test_an_unloaded_adapter_finishes_its_queued_rows_and_a_new_one_under_its_name_gets_its_own(family_models):
    fm = family_models["bert"]
    engine = engine_for(fm, adapters=())
    engine.add_adapter("x", fm["adapters"]["a1"])
    before = engine.submit("x", TEXTS)
    engine.remove_adapter("x")
    with pytest.raises(NotFound, match="'x' is not served"):
        engine.submit("x", TEXTS)
    assert len(engine.slots) == 1  # a1's weights stay while its rows wait
    engine.add_adapter("x", fm["adapters"]["a2"])
    after = engine.submit("x", TEXTS)
    assert len(engine.slots) == 2
    with engine:
        old, new = before.result(60), after.result(60)
    assert engine.metrics.value("batch_rows") == 1  # both generations of 'x' in one pass
    assert_close(old.vectors, fm["refs"]["a1"]["document"])
    assert_close(new.vectors, fm["refs"]["a2"]["document"])
    assert len(engine.slots) == 1  # the retired slot went with its last row
    assert [m["id"] for m in engine.models()] == ["base", "x"]


def test_concurrent_requests_while_an_adapter_is_loaded_and_unloaded_never_fail_or_mix(family_models):
    fm = family_models["bert"]
    engine = engine_for(fm, adapters=("a1",), max_wait_ms=2)
    events: list[tuple[float, float, str]] = []  # (loaded at, unload started at, weights) per generation of 'hot'
    results: list[tuple[str, float, float, object]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        for i in range(40):
            if stop.is_set():
                return
            name = ("base", "a1", "hot")[(i + k) % 3]
            texts = TEXTS[(i % 3):(i % 3) + 3]
            t_call = time.monotonic()
            try:
                fut = engine.submit(name, texts)
            except NotFound:  # 'hot' between an unload and the next load: refused up front, never half-served
                assert name == "hot"
                continue
            t_back = time.monotonic()
            res = fut.result(60)  # an accepted request never fails
            with lock:
                results.append((name, t_call, t_back, (i % 3, res.vectors)))

    with engine:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for g in range(6):
            weights = ("a2", "a3")[g % 2]
            engine.add_adapter("hot", fm["adapters"][weights])
            loaded = time.monotonic()
            time.sleep(0.05)  # let requests for this generation arrive (the test's pace, not an assertion)
            unloading = time.monotonic()
            engine.remove_adapter("hot")
            events.append((loaded, unloading, weights))
        stop.set()
        for t in threads:
            t.join(120)
    assert results and {r[0] for r in results} == {"base", "a1", "hot"}
    hot = 0
    for name, t_call, t_back, (start, vectors) in results:
        if name != "hot":
            assert_close(vectors, fm["refs"][name]["document"][start:start + 3])
            continue
        # Accepted between a load and the start of its unload: that generation's weights exactly.
        owner = [w for loaded, unloading, w in events if loaded < t_call and t_back < unloading]
        candidates = owner or ["a2", "a3"]
        ok = [w for w in candidates if np.abs(vectors - fm["refs"][w]["document"][start:start + 3]).max() < 1e-5]
        assert ok, f"'hot' got vectors of no adapter it was bound to ({candidates})"
        hot += bool(owner)
    assert hot > 0
    assert engine.slots == [engine._models["a1"].slot]  # every retired 'hot' slot is gone
    assert engine.queue_rows == 0


def test_a_request_larger_than_the_token_budget_is_split_over_passes_in_order(family_models):
    fm = family_models["qwen3"]
    engine = engine_for(fm, adapters=("a1",), max_batch_tokens=40, max_wait_ms=0)
    with engine:
        res = engine.embed("a1", TEXTS, "query", timeout=60)
    assert engine.metrics.value("batch_rows") >= 3
    assert_close(res.vectors, fm["refs"]["a1"]["query"])


def test_bad_input_is_refused_with_the_reason_and_the_engine_keeps_serving(family_models):
    fm = family_models["bert"]
    engine = engine_for(fm, adapters=("a1",), max_inputs=4)
    bad = [([], "empty list"), ([""], r"input\[0\] is an empty string"), (["ok", 3], r"input\[1\] is a int"),
           (5, "string or a list of strings"), ({"text": "x"}, "string or a list of strings"),
           (["a"] * 5, "at most 4 per request"), ([[101, 102]], r"token arrays are not accepted")]
    for texts, message in bad:
        with pytest.raises(BadRequest, match=message):
            engine.submit("a1", texts)
    with pytest.raises(BadRequest, match="input_type 'passage'"):
        engine.submit("a1", ["tv"], "passage")
    with pytest.raises(NotFound, match="'nope' is not served; served models: base, a1"):
        engine.submit("nope", ["tv"])
    assert engine.queue_rows == 0 and engine._models["a1"].pending == 0  # nothing was left reserved
    with engine:
        assert_close(engine.embed("a1", "tv", timeout=60).vectors, fm["refs"]["a1"]["document"][1:2])


def test_a_text_past_max_length_is_cut_by_default_and_refused_without_truncation(family_models):
    fm = family_models["bert"]
    long = TEXTS[-1]
    strict = engine_for(fm, adapters=("a3",), truncate=False)
    with pytest.raises(TooLarge, match=r"input\[1\] has \d+ tokens, more than the model's max_length 16") as e:
        strict.submit("a3", ["tv", long])
    assert e.value.status == 413 and e.value.code == "context_length_exceeded"
    with pytest.raises(TooLarge, match="max_length 128"):
        strict.submit("base", [long])
    assert strict.queue_rows == 0
    with strict:
        assert_close(strict.embed("a3", ["tv"], timeout=60).vectors, fm["refs"]["a3"]["document"][1:2])
    cutting = engine_for(fm, adapters=("a3",))
    with cutting:
        res = cutting.embed("a3", [long], timeout=60)
    assert res.prompt_tokens == 16  # a3 was trained at max_length 16: it is cut there, as its export cuts it
    assert_close(res.vectors, fm["refs"]["a3"]["document"][-1:])


def test_a_full_queue_refuses_until_its_rows_are_embedded(family_models):
    fm = family_models["bert"]
    engine = engine_for(fm, adapters=("a1",), max_queue_rows=4, max_inputs=4)
    first = engine.submit("a1", TEXTS[:3])
    with pytest.raises(Overloaded, match=r"queue is full \(3 of 4 rows"):
        engine.submit("base", TEXTS[:2])
    last = engine.submit("base", TEXTS[:1])
    assert engine.metrics.value("rejected_total", reason="queue_full") == 1
    with engine:
        assert_close(first.result(60).vectors, fm["refs"]["a1"]["document"][:3])
        assert_close(last.result(60).vectors, fm["refs"]["base"]["document"][:1])
        assert engine.embed("a1", TEXTS[:4], timeout=60).vectors.shape[0] == 4
    with pytest.raises(Overloaded, match="shutting down"):
        engine.submit("a1", ["tv"])


def test_an_adapter_of_another_base_or_a_broken_folder_is_refused_and_nothing_changes(family_models, tmp_path):
    fm = family_models["bert"]
    engine = engine_for(fm, adapters=("a1",))
    with pytest.raises(ModelError, match="was trained on base model .* but the model given is"):
        engine.add_adapter("q", family_models["qwen3"]["adapters"]["a1"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="missing adapter_config.json"):
        engine.add_adapter("e", tmp_path / "empty")
    with pytest.raises(Conflict, match="'a1' is already served"):
        engine.add_adapter("a1", fm["adapters"]["a2"])
    with pytest.raises(BadRequest, match="is the base model"):
        engine.remove_adapter("base")
    with pytest.raises(NotFound, match="no adapter named 'zz'"):
        engine.remove_adapter("zz")
    with pytest.raises(BadRequest, match="model name 'a b'"):
        engine.add_adapter("a b", fm["adapters"]["a2"])
    assert [m["id"] for m in engine.models()] == ["base", "a1"] and len(engine.slots) == 1
    with engine:
        assert_close(engine.embed("a1", TEXTS, timeout=60).vectors, fm["refs"]["a1"]["document"])


def test_the_last_adapter_unloaded_leaves_the_base_served(family_models, tmp_path):
    fm = family_models["qwen3"]
    engine = engine_for(fm, adapters=("a2",))
    engine.remove_adapter("a2")
    assert engine.slots == []
    with engine:
        assert_close(engine.embed("base", TEXTS, "query", timeout=60).vectors, fm["refs"]["base"]["query"])
        engine.add_adapter("a2", make_adapter(fm["base"], tmp_path / "again", seed=2, r=8,
                                              targets=("q_proj", "v_proj")))
        assert_close(engine.embed("a2", TEXTS, timeout=60).vectors, fm["refs"]["a2"]["document"])


def test_a_request_whose_caller_gave_up_is_dropped_and_frees_its_unloaded_adapter(family_models):
    fm = family_models["bert"]
    engine = engine_for(fm, adapters=("a1", "a2"))
    gone = engine.submit("a1", TEXTS)  # its client disconnects before the batch is taken
    kept = engine.submit("a2", TEXTS)
    engine.remove_adapter("a1")
    assert gone.cancel() and len(engine.slots) == 2
    with engine:
        assert_close(kept.result(60).vectors, fm["refs"]["a2"]["document"])
    assert gone.cancelled() and engine.metrics.value("rejected_total", reason="cancelled") == 1
    assert engine.metrics.value("batch_rows", sum=True) == len(TEXTS)  # its rows were never embedded
    assert engine.slots == [engine._models["a2"].slot] and engine.queue_rows == 0


@pytest.mark.parametrize("adapters", [("a1",), ()])
def test_the_served_forward_builds_no_kv_cache(family_models, adapters):
    # With adapters (peft's mixed-batch forward) and without (the bare base): a decoder whose config
    # asks for a KV cache would build and fill one on every batch.
    engine = engine_for(family_models["qwen3"], adapters=adapters, max_wait_ms=0)
    engine._backbone.config.use_cache = True  # as the published Qwen3 configs and transformers 5.17 leave it
    outputs = []
    hook = engine._backbone.register_forward_hook(lambda m, args, out: outputs.append(out))
    try:
        with engine:
            engine.submit(adapters[0] if adapters else "base", TEXTS, "document").result(60)
    finally:
        hook.remove()
    assert outputs and all(getattr(o, "past_key_values", None) is None and getattr(o, "cache", None) is None
                           for o in outputs)
