"""Artifact folders are swapped in whole, with the permissions the user's umask gives."""

import os
import stat

from embedft.atomic import replace_dir, temp_sibling


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
