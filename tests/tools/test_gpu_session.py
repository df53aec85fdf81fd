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
    failed = {r["name"]: (tmp_path / "out" / f"{r['name']}.log").read_text()[-2000:]
              for r in records[1:] if r["rc"] != 0}
    assert not failed, failed
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "smoke run" in summary and all(f"| {s.name} | 0 |" in summary for s in session.STEPS)
    assert "faiss" in records[0]["environment"] and "NOT IMPORTABLE" not in records[0]["environment"]
    mfu = (tmp_path / "out" / "1-mfu.log").read_text()
    assert "tiny Qwen3 LoRA Q/K/V training" in mfu and "| 8 | yes |" in mfu  # the batch above --mini-batch
    assert "--write" not in records[1]["argv"] and "Tables gpu_check wrote" not in summary
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


def test_prepare_pins_each_wheel_from_constraints(session):
    pins = session._pins(session.REPO / "constraints.txt")
    assert all(pins.get(name) for name in session.WHEELS)


def test_run_command_passes_its_bundle_and_exits_by_the_steps(session, tmp_path, monkeypatch):
    seen = {}

    def fake_run(out, budget_s, smoke, bundle):
        seen.update(out=out, budget=budget_s, smoke=smoke, bundle=bundle)
        (out / "summary.md").parent.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text("summary\n")
        return [{"name": "0-setup", "rc": 0}, {"name": "1-mfu", "rc": seen.get("rc", 0)}, {"name": "2", "rc": None}]

    monkeypatch.setattr(session, "run", fake_run)
    with pytest.raises(SystemExit) as ok:
        session.main(["run", "--smoke", "--bundle", str(tmp_path / "b"), "--out", str(tmp_path / "o"), "--budget", "60"])
    assert ok.value.code == 0 and seen == {"out": tmp_path / "o", "budget": 60.0, "smoke": True, "bundle": tmp_path / "b"}
    seen["rc"] = "timeout"  # a step cut at its cap fails the call; a skipped one (rc None) does not
    with pytest.raises(SystemExit) as failed:
        session.main(["run", "--out", str(tmp_path / "o")])
    assert failed.value.code == 1 and seen["bundle"] == session.BUNDLE and seen["smoke"] is False
