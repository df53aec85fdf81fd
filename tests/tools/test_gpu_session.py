"""tools/gpu_session.py: every step of the GPU lease runs (tiny models, CPU), and the budget is kept."""

import sys

import pytest


@pytest.fixture(scope="module")
def session(benchmark_script):
    return benchmark_script("gpu_session", "tools")


@pytest.mark.slow
def test_smoke_run_passes_every_step_with_its_real_flags(session, tmp_path):
    docs = tmp_path / "benchmarks.md"  # never the repo's: the run restores its docs file when it ends
    docs.write_text("# Benchmarks\n")
    records = session.run(tmp_path / "out", budget_s=900, smoke=True, bundle=tmp_path / "empty-bundle", docs=docs)
    assert [r["name"] for r in records] == ["0-setup"] + [s.name for s in session.STEPS]
    failed = {r["name"]: (tmp_path / "out" / r["log"]).read_text()[-2000:] for r in records[1:] if r["rc"] != 0}
    assert not failed, failed
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "smoke run" in summary and all(f"| {s.name} | 0 |" in summary for s in session.STEPS)
    assert "faiss" in records[0]["environment"] and "NOT IMPORTABLE" not in records[0]["environment"]
    mfu = (tmp_path / "out" / "1-mfu.log").read_text()
    assert "tiny Qwen3 LoRA Q/K/V training" in mfu and "| 8 | yes |" in mfu  # the batch above --mini-batch
    assert "--write" not in records[1]["argv"] and "Tables the steps wrote" not in summary
    # QLoRA's step runs in a smoke run without bitsandbytes or CUDA: bf16 trains, nf4 is skipped by the script.
    qlora = (tmp_path / "out" / "4-qlora.log").read_text()
    assert "| bf16 | no | 3 |" in qlora and "nf4: skipped: " in qlora
    again = (tmp_path / "out" / "7-8-met-before.log").read_text()  # two steps, one log
    assert again.count("$ ") == 2 and "bench_train.py" in again and "bench_encode.py" in again
    assert len(list((tmp_path / "out").iterdir())) <= 8  # all that the device tool brings back


def test_budget_skips_steps_below_their_floor_and_stops_a_step_at_its_cap(session, tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    table = "### GPU check\n\n| batch | MFU |\n|---|---|\n| 64 | 41.0% |"
    steps = (session.Step("a-quick", (sys.executable, "-c", f"print('hello'); open({str(docs)!r}, 'a').write("
                                                            f"{chr(10) + table!r})"), 0, 30),
             session.Step("b-hangs", (sys.executable, "-c", "import time; print('started', flush=True); "
                                                            "time.sleep(60)"), 0, 2),
             session.Step("c-too-big", (sys.executable, "-c", "print('never')"), 10**6, 30))
    records = session.run(tmp_path / "out", budget_s=600, smoke=True, bundle=tmp_path / "b", steps=steps, docs=docs)
    by_name = {r["name"]: r for r in records}
    assert by_name["a-quick"]["rc"] == 0 and "hello" in (tmp_path / "out" / "a-quick.log").read_text()
    assert by_name["b-hangs"]["rc"] == "timeout" and by_name["b-hangs"]["seconds"] < 20
    assert "started" in (tmp_path / "out" / "b-hangs.log").read_text()  # what it printed is kept
    assert by_name["c-too-big"]["rc"] is None and "floor" in by_name["c-too-big"]["skipped"]
    assert not (tmp_path / "out" / "c-too-big.log").exists()
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| c-too-big | skipped (" in summary
    assert summary.rstrip().endswith(table) and docs.read_text() == "# Benchmarks\n"  # the table came back, docs restored


def test_a_step_without_its_module_is_skipped_saying_so_and_fails_nothing(session, tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    steps = (session.Step("a-qlora", (sys.executable, "-c", "print('never')"), 0, 30, needs=("bitsandbytes_absent",)),
             session.Step("b-next", (sys.executable, "-c", "print('next')"), 0, 30, needs=("json",)))
    records = session.run(tmp_path / "out", budget_s=600, smoke=False, bundle=tmp_path / "b", steps=steps, docs=docs)
    by_name = {r["name"]: r for r in records}
    assert by_name["a-qlora"]["rc"] is None and by_name["a-qlora"]["skipped"] == "bitsandbytes_absent not installed"
    assert by_name["b-next"]["rc"] == 0 and not (tmp_path / "out" / "a-qlora.log").exists()
    assert "| a-qlora | skipped (bitsandbytes_absent not installed) |" in (tmp_path / "out" / "summary.md").read_text()


def test_qlora_comes_after_the_unmet_targets_and_two_steps_share_a_log(session):
    names = [s.name for s in session.STEPS]
    assert names[:4] == ["1-mfu", "2-encode-minilm", "3-train-qwen3", "4-qlora"]
    qlora = session.STEPS[3]
    assert qlora.needs == ("bitsandbytes",) and qlora.floor_s <= qlora.cap_s <= 540 and "{docs}" in qlora.argv
    assert set(session.SMOKE_ARGS) <= set(names) and "--tiny" in session.SMOKE_ARGS["4-qlora"]
    assert len({s.log or s.name for s in session.STEPS}) + 1 <= 8  # logs and summary.md: what comes back
    assert [s.name for s in session.select_steps("4-qlora")] == ["4-qlora"]
    assert [s.name for s in session.select_steps("5,1")] == ["1-mfu", "5-tests-cuda"]  # priority order kept
    with pytest.raises(SystemExit, match="no step 9-nothing"):
        session.select_steps("9-nothing")


def test_a_carried_wheel_is_slimmed_with_its_record(session, tmp_path):
    import zipfile

    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda118.so",
             "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_rocm64.so"]
    with zipfile.ZipFile(wheel, "w") as z:
        for n in names:
            z.writestr(n, "x" * 100)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD",
                   "".join(f"{n},sha256=abc,100\n" for n in names) + "bitsandbytes-0.50.2.dist-info/RECORD,,\n")
    session.slim_wheel(wheel, lambda n: "cuda118" not in n and "rocm" not in n)
    with zipfile.ZipFile(wheel) as z:
        kept = z.namelist()
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert kept == [names[0], names[1], names[3], "bitsandbytes-0.50.2.dist-info/RECORD"]
    assert "cuda130" in record and "cuda118" not in record and "rocm" not in record


def test_prepare_pins_each_wheel_from_constraints(session):
    pins = session._pins(session.REPO / "constraints.txt")
    assert all(pins.get(name) for name in session.WHEELS)
    # bitsandbytes is pinned by the session alone (no CPU machine installs it), as the GPU image's smoke run has it.
    assert "bitsandbytes" not in pins and session.GPU_WHEELS["bitsandbytes"]
    assert f"bitsandbytes=={session.GPU_WHEELS['bitsandbytes']}" in (session.REPO / "tools" / "gpu-image.txt").read_text()


def test_run_command_passes_its_bundle_and_exits_by_the_steps(session, tmp_path, monkeypatch):
    seen = {}

    def fake_run(out, budget_s, smoke, bundle, steps):
        seen.update(out=out, budget=budget_s, smoke=smoke, bundle=bundle, steps=[s.name for s in steps])
        (out / "summary.md").parent.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text("summary\n")
        return [{"name": "0-setup", "rc": 0}, {"name": "1-mfu", "rc": seen.get("rc", 0)}, {"name": "2", "rc": None}]

    monkeypatch.setattr(session, "run", fake_run)
    with pytest.raises(SystemExit) as ok:
        session.main(["run", "--smoke", "--bundle", str(tmp_path / "b"), "--out", str(tmp_path / "o"), "--budget", "60"])
    assert ok.value.code == 0 and seen == {"out": tmp_path / "o", "budget": 60.0, "smoke": True, "bundle": tmp_path / "b",
                                           "steps": [s.name for s in session.STEPS]}
    seen["rc"] = "timeout"  # a step cut at its cap fails the call; a skipped one (rc None) does not
    with pytest.raises(SystemExit) as failed:
        session.main(["run", "--out", str(tmp_path / "o"), "--steps", "4-qlora"])
    assert failed.value.code == 1 and seen["bundle"] == session.BUNDLE and seen["smoke"] is False
    assert seen["steps"] == ["4-qlora"]
