"""A writer killed with SIGKILL (no cleanup runs) inside a file, just before and just after the swap into place:
any file (atomic.write_text), the evaluation report, the index folder. Each leaves the artifact as it was or whole
and new, never half, and the next write works and removes what the kill left. The export, the checkpoint and the
spool have theirs beside their disk faults (test_export_faults.py, test_write_faults.py, test_spool_faults.py).
The writer runs in a child process armed by tests/faults/disk.py, which checks that it died at its point."""

import json

import pytest
from faults.disk import run_killed, visible

from embedft.atomic import write_text


@pytest.mark.parametrize("after, survives", [(7, "old"), ("before", "old"), ("after", "new")])
def test_a_file_killed_while_written_is_old_or_new(tmp_path, after, survives):
    out = tmp_path / "summary.json"
    write_text(out, "old" * 2000)
    run_killed("summary.json", after, f"from pathlib import Path\nfrom embedft.atomic import write_text\n"
                                      f"write_text(Path({str(out)!r}), 'new' * 2000)", tmp_path)
    assert out.read_text() == survives * 2000 and visible(tmp_path) == ["summary.json"]
    write_text(out, "next")  # and removes what the kill left (sweep_leftovers)
    assert out.read_text() == "next" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


REPORT = """
from embedft.evaluation.report import write_report
from embedft.evaluation.tasks import EvalOutput
write_report({out!r}, None, EvalOutput({{"retrieval/recall@1": 0.9}}, {{}}), {{"name": "second"}})
"""


@pytest.mark.parametrize("at, after, survives", [("report.json", 4096, "first"), ("report.md", 7, "first"),
                                                 ("eval", "before", "first"), ("eval", "after", "second")])
def test_a_report_killed_while_written_is_the_earlier_or_the_new_one(tmp_path, at, after, survives):
    from embedft.evaluation.report import write_report
    from embedft.evaluation.tasks import EvalOutput

    out = write_report(tmp_path / "eval", None, EvalOutput({"retrieval/recall@1": 0.5}, {}), {"name": "first"})
    run_killed(at, after, REPORT.format(out=str(out)), tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["name"] == survives and (out / "report.md").is_file() and visible(tmp_path) == ["eval"]
    write_report(out, None, EvalOutput({"retrieval/recall@1": 0.7}, {}), {"name": "third"})
    assert json.loads((out / "report.json").read_text())["meta"]["name"] == "third"
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]  # what the kill left is gone


INDEX = """
import faiss, numpy as np
from embedft.evaluation.index import save_index
index = faiss.IndexFlatIP(4)
index.add(np.eye(4, dtype=np.float32)[::-1].copy())
save_index({out!r}, index, ["d", "c", "b", "a"], {{"model": "second"}}, overwrite=True)
"""


@pytest.mark.parametrize("at, after, survives", [("ids.json", 7, "first"), ("manifest.json", 4096, "first"),
                                                 ("idx", "before", "first"), ("idx", "after", "second")])
def test_an_index_killed_while_written_is_the_earlier_or_the_new_one(tmp_path, at, after, survives):
    import faiss
    import numpy as np

    from embedft.evaluation.index import load_index, save_index

    index = faiss.IndexFlatIP(4)
    index.add(np.eye(4, dtype=np.float32))
    out = save_index(tmp_path / "idx", index, ["a", "b", "c", "d"], {"model": "first"})
    run_killed(at, after, INDEX.format(out=str(out)), tmp_path)
    loaded = load_index(out)
    assert loaded[2]["model"] == survives and visible(tmp_path) == ["idx"]
    assert loaded[1] == (["a", "b", "c", "d"] if survives == "first" else ["d", "c", "b", "a"])
    save_index(out, index, ["a", "b", "c", "d"], {"model": "third"}, overwrite=True)
    assert load_index(out)[2]["model"] == "third" and [p.name for p in tmp_path.iterdir()] == ["idx"]
