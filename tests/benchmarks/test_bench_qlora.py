"""benchmarks/bench_qlora.py on the CPU: its smoke mode, the nf4 side's skip, and the curve comparison."""

import pytest

SMOKE = ["--tiny", "--steps", "4", "--batch-size", "8", "--data", "sample", "--window", "2"]


def test_smoke_mode_trains_bf16_and_skips_nf4_saying_why(benchmark_script, tmp_path, capsys):
    mod = benchmark_script("bench_qlora")
    out = tmp_path / "bench.md"
    out.write_text("# Benchmarks\n")
    mod.main(SMOKE + ["--write", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "nf4: skipped: " in printed and "train.device=cpu" in printed  # and no probe of it
    table = out.read_text()
    assert table.startswith("# Benchmarks\n\n### QLoRA: tiny Qwen3 LoRA Q/K/V training on a quantised base against bf16")
    assert "| bf16 | no | 4 | n/a |" in table and "| nf4 | no | skipped: " in table and "| nf4 | yes |" not in table
    assert "| bf16, LoRA seed 43 | no | 4 | n/a |" in table and "--noise-seed 43" in table
    assert "- bf16, LoRA seed 43 against bf16, the run-to-run noise of this comparison: smoothed loss within " in table


def test_a_quantised_side_is_compared_with_bf16_on_the_same_batches(benchmark_script, monkeypatch, capsys):
    """With bitsandbytes' load stood in for by the plain one, both sides train the same model from the
    same LoRA initialisation on the same batches: identical loss curves, a 0.0% gap."""
    from embedft.modeling import builders, quantization

    mod = benchmark_script("bench_qlora")
    real_build, loads = builders.build_encoder, []

    def build_encoder(model, device="cpu", lora=None, base_dtype=None, quantization=None):
        loads.append((quantization, model.gradient_checkpointing))
        return real_build(model, device)

    monkeypatch.setattr(quantization, "unavailable_reasons", lambda q, device: [])
    monkeypatch.setattr(builders, "build_encoder", build_encoder)
    sides = mod.run(mod.parse_args(SMOKE + ["--checkpointed-probe", "2", "--noise-seed", "7"]))
    assert loads == [(None, False), ("nf4", False), ("nf4", True), (None, False)]
    assert [(s.base, s.checkpointing, s.steps, len(s.losses), s.lora_seed) for s in sides] == [
        ("bf16", False, 4, 4, None), ("nf4", False, 4, 4, None), ("nf4", True, 2, 2, None), ("bf16", False, 4, 4, 7)]
    assert sides[0].losses == sides[1].losses and sides[1].samples_per_s > 0
    # The noise side: bf16 again from another adapter start, so its curve differs (and says by how much).
    assert sides[3].losses != sides[0].losses
    gap, _ = mod.max_relative_gap(sides[0].losses, sides[3].losses, 2)
    table = capsys.readouterr().out
    assert "| step | bf16 | nf4 | bf16, LoRA seed 7 |" in table
    assert "- nf4 against bf16: smoothed loss within 0.0% (largest gap at step" in table
    assert ("- bf16, LoRA seed 7 against bf16, the run-to-run noise of this comparison: smoothed loss within "
            f"{100 * gap:.1f}%") in table


def test_smoothed_curves_and_their_largest_relative_gap(benchmark_script):
    mod = benchmark_script("bench_qlora")
    assert mod.smoothed([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    gap, step = mod.max_relative_gap([2.0, 2.0, 2.0, 2.0], [2.0, 2.2, 2.0, 1.9], 2)
    assert (gap, step) == (pytest.approx(0.05), 2)  # (2 + 2.2) / 2 = 2.1 against 2.0; the first window is step 2
