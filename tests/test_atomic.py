"""Artifact folders are swapped in whole, with the permissions the user's umask gives."""

import os
import stat
from pathlib import Path

import pytest

from embedft.atomic import replace_dir, temp_sibling, write_text


def _mode(p) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_replace_dir_swaps_whole_and_gives_files_the_umasks_mode(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp = temp_sibling(out)
    (tmp / "sub").mkdir()
    for f in (tmp / "weights.safetensors", tmp / "sub" / "x.json"):
        f.write_text("new")
        f.chmod(0o600)  # as safetensors >= 0.8 writes its files
    old_mask = os.umask(0o027)
    try:
        replace_dir(tmp, out)
    finally:
        os.umask(old_mask)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["sub", "sub/x.json", "weights.safetensors"]
    assert _mode(out / "weights.safetensors") == _mode(out / "sub" / "x.json") == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary or old folder left


def test_temp_sibling_is_a_hidden_folder_beside_out(tmp_path):
    out = tmp_path / "runs" / "adapter"
    tmp = temp_sibling(out)
    # Beside out, on its filesystem: the final rename is atomic (a temp dir elsewhere could need a copy).
    assert tmp.is_dir() and tmp.parent == out.parent and tmp.name.startswith(".adapter.tmp-")
    assert temp_sibling(out) != tmp


def test_replace_dir_swaps_the_two_folders_in_one_step_where_the_file_system_can(tmp_path, monkeypatch):
    import embedft.atomic as A

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "weights").write_text("old")
    tmp = temp_sibling(out)
    (tmp / "weights").write_text("new")
    calls = []
    real = A._exchange
    monkeypatch.setattr(A, "_exchange", lambda a, b: calls.append((a, b)) or real(a, b))
    monkeypatch.setattr(A.os, "replace", lambda *a: pytest.fail("moved the old folder aside: a kill there loses it"))
    replace_dir(tmp, out)
    assert calls == [(tmp, out)] and (out / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_replace_dir_restores_the_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    import embedft.atomic as A

    monkeypatch.setattr(A, "_exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE (e.g. NFS)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "weights").write_text("old")
    tmp = temp_sibling(out)
    (tmp / "weights").write_text("new")
    real = os.replace

    def fail_moving_tmp(src, dst):
        if Path(src) == tmp:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(A.os, "replace", fail_moving_tmp)
    with pytest.raises(OSError, match="No space left"):
        replace_dir(tmp, out)
    assert (out / "weights").read_text() == "old"  # never lost, never half replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter", tmp.name])  # tmp left to the caller


def test_write_text_keeps_the_old_file_and_no_temporary_when_it_fails(tmp_path, monkeypatch):
    import embedft.atomic as A

    out = tmp_path / "summary.json"
    out.write_text("old")

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(A.os, "replace", fail)
    with pytest.raises(OSError):
        write_text(out, "new")
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    monkeypatch.undo()
    write_text(out, "new")
    assert out.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_held_folder_is_refused_to_a_second_holder_and_freed_after(tmp_path):
    from embedft.atomic import LOCK_FILE, holding
    from embedft.errors import WriteError

    with holding(tmp_path, "embedft train", "use another folder"):
        lock = (tmp_path / LOCK_FILE).read_text()
        with pytest.raises(WriteError) as e, holding(tmp_path, "embedft train", "use another folder"):
            pass
        # The message names the folder, the holder and the way out; the holder's lock is untouched.
        assert str(e.value).startswith(f"{tmp_path} is in use by another embedft train: process {os.getpid()} on ")
        assert str(e.value).endswith("Wait for it to end, or use another folder")
        assert (tmp_path / LOCK_FILE).read_text() == lock
    assert not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(RuntimeError), holding(tmp_path, "embedft train", "x"):  # freed however the block ends
        raise RuntimeError("boom")
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_folder_held_by_another_process_is_refused_until_that_process_is_killed(tmp_path):
    """A SIGKILL runs no cleanup: the lock file stays, but the kernel drops the lock, so it does not block."""
    import signal
    import subprocess
    import sys

    from embedft.atomic import LOCK_FILE, holding
    from embedft.errors import WriteError

    code = (f"import sys, time; from pathlib import Path; from embedft.atomic import holding\n"
            f"with holding(Path({str(tmp_path)!r}), 'embedft train', 'x'):\n"
            f"    print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(WriteError, match=f"in use by another embedft train: process {child.pid} on "):
            with holding(tmp_path, "embedft train", "x"):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (tmp_path / LOCK_FILE).read_text().startswith(f"{child.pid} ")  # left behind by the kill
    with holding(tmp_path, "embedft train", "x"):
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"{os.getpid()} ")
    assert not (tmp_path / LOCK_FILE).exists()
