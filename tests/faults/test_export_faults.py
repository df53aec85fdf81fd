"""Disk faults in `embedft export`: at each file it writes, its own (probes, reference vectors, export meta, model
card) and the libraries' (sentence-transformers' configs, safetensors' weights, torch.onnx's graph), and at the
swap into place. One WriteError naming the file (the folder where the library does not say which) and the fix;
no temporary folder left; an earlier export kept whole; the next export works. And an export killed (SIGKILL)
inside the weights or at the swap: the earlier export or the new one, whole."""

import errno
import hashlib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from faults.disk import CAUSE, run_killed, visible

from embedft.errors import WriteError
from embedft.export.merge import export_merged
from embedft.export.verify import verify_export

PROBES = ["apple iphone 8 plus 64gb silver", "tv", "bosch serie 6 washing machine", "How do I reset my password?"]
ENOSPC, EACCES, EROFS = errno.ENOSPC, errno.EACCES, errno.EROFS


@pytest.fixture(scope="module")
def earlier(tiny_bert_adapter, tmp_path_factory) -> Path:
    """An export made before the failing one (which uses --overwrite onto a copy of it)."""
    out = tmp_path_factory.mktemp("earlier") / "export"
    export_merged(tiny_bert_adapter, out, probe_texts=PROBES)
    return out


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its digest."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def expected(out: Path, named: str, code: int, earlier_there: bool) -> str:
    fix = "free space there or pass another --out" if code == ENOSPC else "pass another --out (a folder you can write)"
    kept = f"the earlier export at {out} is kept" if earlier_there else f"nothing was written to {out}"
    return f"cannot write {out / named if named else out}: {CAUSE[code]}; {fix}; {kept}"


# (file, bytes written or rename point, errno, which write of that name, what the message names, earlier export)
CASES = [
    ("config.json", 7, ENOSPC, 1, "", True),  # sentence-transformers' configs (Python): the file is not said
    ("model.safetensors", 0, ENOSPC, 1, "", False),  # the weights (safetensors, in Rust)
    ("model.safetensors", 4096, ENOSPC, 1, "", True),
    ("model.safetensors", 7, EACCES, 1, "", True),
    ("model.safetensors", 7, EROFS, 1, "", False),
    ("probes.json", 0, ENOSPC, 1, "probes.json", True),  # embedft's own files (atomic.write_bytes)
    ("probes.json", 4096, EACCES, 1, "probes.json", False),
    ("probe_embeddings.npy", 7, EROFS, 1, "probe_embeddings.npy", True),
    ("embedft_export.json", 7, ENOSPC, 1, "embedft_export.json", False),
    ("README.md", 7, ENOSPC, 2, "README.md", True),  # the model card, written over sentence-transformers' own
    ("export", "before", EACCES, 1, "", True),  # the swap into place
    ("export", "before", EROFS, 1, "", False),
]


@pytest.mark.parametrize("at, after, code, nth, named, earlier_there", CASES)
def test_an_export_the_disk_refuses_is_one_error_and_leaves_the_earlier_one(earlier, tiny_bert_adapter, tmp_path,
                                                                              disk, at, after, code, nth, named,
                                                                              earlier_there):
    out = tmp_path / "export"
    if earlier_there:
        shutil.copytree(earlier, out)
    point = disk(at, after, code, nth)
    with pytest.raises(WriteError) as e:
        export_merged(tiny_bert_adapter, out, probe_texts=PROBES, overwrite=True)
    assert point.fired and str(e.value) == expected(out, named, code, earlier_there)
    assert [p.name for p in tmp_path.iterdir()] == (["export"] if earlier_there else [])  # no temporary folder
    if earlier_there:
        assert tree(out) == tree(earlier)


def test_an_onnx_graph_the_disk_refuses_is_named(earlier, tiny_bert_adapter, tmp_path, disk):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "export"
    shutil.copytree(earlier, out)
    disk("model.onnx", 4096, ENOSPC)  # torch.onnx's writer, which would otherwise be called an unsupported model
    with pytest.raises(WriteError) as e:
        export_merged(tiny_bert_adapter, out, probe_texts=PROBES, overwrite=True, onnx=True)
    assert str(e.value) == expected(out, "onnx/model.onnx", ENOSPC, True)
    assert tree(out) == tree(earlier) and [p.name for p in tmp_path.iterdir()] == ["export"]


def test_the_cli_says_it_in_one_line_and_the_next_export_works(earlier, tiny_bert_adapter, tmp_path, disk):
    from embedft.cli import main

    out = tmp_path / "export"
    shutil.copytree(earlier, out)
    args = ["export", "--adapter", str(tiny_bert_adapter), "--out", str(out), "--overwrite"]
    disk("model.safetensors", 4096, ENOSPC)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")] == \
        [f"error: {expected(out, '', ENOSPC, True)}"]
    res = CliRunner().invoke(main, args)  # space again
    assert res.exit_code == 0, res.output
    assert tree(out) != tree(earlier) and verify_export(out)["ok"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


EXPORT = """
from embedft.export.merge import export_merged
export_merged({adapter!r}, {out!r}, probe_texts={probes!r}, overwrite=True)
"""


@pytest.mark.slow  # a child process loading torch and the model
@pytest.mark.parametrize("at, after, new", [("model.safetensors", 4096, False), ("export", "before", False),
                                            ("export", "after", True)])
def test_an_export_killed_while_written_is_the_earlier_or_the_new_one(earlier, tiny_bert_adapter, tmp_path, at,
                                                                      after, new):
    out = tmp_path / "export"
    shutil.copytree(earlier, out)
    run_killed(at, after, EXPORT.format(adapter=str(tiny_bert_adapter), out=str(out), probes=PROBES[:3]), tmp_path)
    assert verify_export(out)["n_probes"] == (3 if new else 4) and visible(tmp_path) == ["export"]
    if not new:
        assert tree(out) == tree(earlier)
    export_merged(tiny_bert_adapter, out, probe_texts=PROBES[:2], overwrite=True)  # the next export works
    assert verify_export(out)["n_probes"] == 2 and [p.name for p in tmp_path.iterdir()] == ["export"]  # swept
