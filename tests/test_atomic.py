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


def test_a_writer_killed_between_the_fallbacks_two_renames_leaves_the_old_folder_for_the_next_write(tmp_path):
    """Without RENAME_EXCHANGE the old folder is moved aside, then the new one in. A writer stopped in between
    holds the old one (no sweep takes it); once it is killed, the next write puts the old one back, whole."""
    import signal
    import subprocess
    import sys

    from embedft.atomic import building, sweep_leftovers

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "weights").write_text("old")
    code = (f"import os, time; from pathlib import Path; import embedft.atomic as A\n"
            f"A._exchange = lambda a, b: False\n"
            f"real = os.replace\n"
            f"def aside(src, dst):\n"
            f"    real(src, dst); print(dst, flush=True); time.sleep(60)\n"
            f"A.os.replace = aside\n"
            f"with A.building(Path({str(out)!r}), 'x') as tmp:\n"
            f"    (tmp / 'weights').write_text('new'); A.replace_dir(tmp, Path({str(out)!r}))")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        old = Path(child.stdout.readline().strip())
        assert old.name.startswith(".adapter.old-") and not out.exists()
        sweep_leftovers(out)  # the writer is alive and holds it: left alone
        assert (old / "weights").read_text() == "old" and not out.exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with building(out, "x") as tmp:  # the next write of the adapter sweeps first: the old one goes back
        assert (out / "weights").read_text() == "old" and not old.exists()
        (tmp / "weights").write_text("next")
        replace_dir(tmp, out)
    assert (out / "weights").read_text() == "next" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    # Killed after the new one was in place: the old one aside is removed, the new one stays.
    (tmp_path / ".adapter.old-0123abcd").mkdir()
    sweep_leftovers(out)
    assert (out / "weights").read_text() == "next" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_resume_finds_a_checkpoint_that_a_killed_writer_left_moved_aside(tmp_path):
    from embedft.training.checkpoint import require_checkpoint

    aside = tmp_path / ".checkpoint.old-0123abcd"  # the fallback's first rename done, the second not
    aside.mkdir()
    (aside / "state.pt").write_bytes(b"state")
    require_checkpoint(tmp_path / "checkpoint")  # no "no checkpoint" error: it is put back first
    assert (tmp_path / "checkpoint" / "state.pt").read_bytes() == b"state" and not aside.exists()


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


def test_temporaries_a_killed_writer_left_are_removed_by_the_next_write_of_that_artifact(tmp_path):
    from embedft.atomic import building, place_new_dir

    out, summary = tmp_path / "adapter", tmp_path / "summary.json"
    left = [tmp_path / ".adapter.tmp-0123abcd", tmp_path / ".summary.json.tmp-89abcdef"]  # as a SIGKILL leaves them
    left[0].mkdir()
    (left[0] / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    left[1].write_text("half")
    others = [tmp_path / ".other.tmp-01234567", tmp_path / ".adapter.tmp-notours"]  # another artifact's; not ours
    for p in others:
        p.mkdir()
    with building(out, "elsewhere") as tmp:
        (tmp / "weights").write_text("new")
        place_new_dir(tmp, out)
    assert not left[0].exists() and left[1].exists()  # each write sweeps its own artifact's leftovers only
    write_text(summary, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter", "summary.json"] + [p.name for p in others])
    assert (out / "weights").read_text() == "new" and summary.read_text() == "new"


def test_a_temporary_a_running_writer_holds_is_left_to_it_until_that_process_dies(tmp_path):
    """Two writers of one artifact at once: neither removes the other's work in progress; once one is killed,
    the next write removes what it left."""
    import signal
    import subprocess
    import sys

    from embedft.atomic import building, place_new_dir

    out = tmp_path / "index"
    code = (f"import time; from pathlib import Path; from embedft.atomic import building\n"
            f"with building(Path({str(out)!r}), 'x') as tmp:\n"
            f"    (tmp / 'vectors').write_text('theirs'); print(tmp, flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        theirs = Path(child.stdout.readline().strip())
        with building(out, "x") as tmp:
            (tmp / "vectors").write_text("ours")
            place_new_dir(tmp, out)
        assert (theirs / "vectors").read_text() == "theirs" and (out / "vectors").read_text() == "ours"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert theirs.exists()  # no cleanup ran in the killed writer
    with building(out, "x") as tmp:
        replace_dir(tmp, out)
    assert not theirs.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_a_writer_whose_fresh_temporary_a_sweep_removed_first_makes_another(tmp_path, monkeypatch):
    """The moment between making a temporary and holding it: a sweep there takes it, the writer starts again."""
    import shutil

    import embedft.atomic as A

    real, taken = A._hold_new, set()

    def swept_once(tmp):  # the first temporary of each artifact
        if tmp.name.split(".tmp-")[0] not in taken:
            taken.add(tmp.name.split(".tmp-")[0])
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        return real(tmp)

    monkeypatch.setattr(A, "_hold_new", swept_once)
    write_text(tmp_path / "summary.json", "new")
    with A.building(tmp_path / "adapter", "x") as tmp:
        (tmp / "weights").write_text("new")
        A.place_new_dir(tmp, tmp_path / "adapter")
    assert taken == {".summary.json", ".adapter"} and (tmp_path / "summary.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "summary.json"]
    with pytest.raises(A._Swept):  # held by a sweep: this writer must not use it
        import fcntl

        held = temp_sibling(tmp_path / "x")
        fd = os.open(held, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            real(held)
        finally:
            os.close(fd)
