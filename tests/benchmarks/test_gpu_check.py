"""The GPU check script runs its full code path on CPU with a tiny Qwen3 (no figures asserted)."""

import pytest


def test_gpu_check_runs_on_cpu_with_a_tiny_model(benchmark_script):
    mod = benchmark_script("gpu_check")
    rows = mod.run([4, 8], steps=2, tiny=True, mini_batch=4, write=False)
    assert [r["batch"] for r in rows] == [4, 8]
    assert [r["cached"] for r in rows] == [False, True]  # the larger batch uses cached negatives
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"] for r in rows)
    assert rows[0]["non_embedding_params"] > 0 and rows[0]["mfu"] is None  # no peak FLOP/s on CPU
    assert not any(r["compiled"] for r in rows) and all(r["first_step_s"] > 0 for r in rows)


def test_gpu_check_compares_compiled_layers_in_the_same_run(benchmark_script):
    mod = benchmark_script("gpu_check")
    rows = mod.run([4], steps=2, tiny=True, mini_batch=4, write=False, compile_modes=(False, True))
    assert [(r["batch"], r["compiled"]) for r in rows] == [(4, False), (4, True)]
    assert all(r["samples_per_s"] > 0 for r in rows)


def test_peak_flops_table(benchmark_script):
    mod = benchmark_script("gpu_check")
    assert mod.peak_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert mod.peak_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert mod.peak_flops("some cpu")[0] is None


def test_gpu_check_call_overhead_is_used_for_the_run_only(benchmark_script, monkeypatch):
    import embedft.training.loop as T
    from embedft.modeling import chunking

    mod = benchmark_script("gpu_check")
    default, seen, real = chunking.CUDA_CALL_OVERHEAD_TOKENS, [], T.train
    monkeypatch.setattr(T, "train", lambda *a, **k: seen.append(chunking.CUDA_CALL_OVERHEAD_TOKENS) or real(*a, **k))
    rows = mod.run([4], steps=2, tiny=True, mini_batch=4, write=False, call_overhead=2048)
    assert seen == [2048] and rows[0]["samples_per_s"] > 0  # the run trains with the overhead given
    assert chunking.CUDA_CALL_OVERHEAD_TOKENS == default  # and the process keeps its default
    # A run that fails midway (out of memory, say) gives the default back too.
    monkeypatch.setattr(T, "train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        mod.run([4], steps=2, tiny=True, mini_batch=4, write=False, call_overhead=2048)
    assert chunking.CUDA_CALL_OVERHEAD_TOKENS == default


def test_gpu_check_profiles_extra_steps_of_one_batch_size_after_the_timed_ones(benchmark_script, monkeypatch):
    import embedft.training.loop as T

    mod = benchmark_script("gpu_check")
    results, real = [], T.train
    monkeypatch.setattr(T, "train", lambda *a, **k: results.append(real(*a, **k)) or results[-1])
    rows = mod.run([4, 8], steps=2, tiny=True, mini_batch=8, write=False, profile_batch=8, profile_steps=1)
    assert [r.steps for r in results] == [2, 3]  # only batch 8 trains one step more, to be profiled
    assert [r["batch"] for r in rows] == [4, 8] and all(r["samples_per_s"] > 0 for r in rows)
    assert "profile" not in rows[0]
    profile = rows[1]["profile"]
    assert profile["reps"] == 1 and profile["device"] == "cpu" and profile["wall_s"] > 0
    assert any(t["name"] == "aten::mm" and t["kind"] == "matmul" for t in profile["top"])  # the q/k/v projections


def test_a_failing_profiler_costs_the_profile_not_the_figures(benchmark_script, monkeypatch, capsys):
    mod, profiling = benchmark_script("gpu_check"), benchmark_script("profiling")  # the module gpu_check imports

    def fail(self):
        raise RuntimeError("CUPTI_ERROR_INSUFFICIENT_PRIVILEGES")

    monkeypatch.setattr(profiling.Profiler, "start", fail)
    rows = mod.run([4], steps=2, tiny=True, mini_batch=8, write=False, profile_batch=4, profile_steps=1)
    assert rows[0]["samples_per_s"] > 0 and "profile" not in rows[0]
    assert "profile of steps 3-3 failed: RuntimeError: CUPTI_ERROR_INSUFFICIENT_PRIVILEGES" in capsys.readouterr().out
