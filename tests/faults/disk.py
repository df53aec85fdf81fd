"""A disk that fails, or a process that dies, at one chosen point of a write (tests/faults).

It hooks every way embedft's writers put bytes on disk:

- `open()` for writing: embedft's own files (`atomic.write_bytes`) and Python libraries' (sentence-transformers'
  and transformers' configs, torch.onnx, peft);
- safetensors' `serialize_file`: weights written by Rust;
- a rename onto the target (`os.replace`, `os.rename`, `atomic._exchange`): a folder or file swapped into place.

A point is a file or folder name (`at`, as it will be named once in place: atomic's `.NAME.tmp-xxxxxxxx` is
NAME), its `nth` write, and how far the write gets: `after` bytes, or "before"/"after" for a rename. There
`fail` raises what a full (ENOSPC), forbidden (EACCES) or read-only (EROFS) disk raises; `kill` SIGKILLs the
process, so no cleanup runs. Each point fires once: the command after it finds a working disk.

`run_killed` runs a writer in a child process armed to SIGKILL itself at a point.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

STRERROR = {errno.ENOSPC: "No space left on device", errno.EACCES: "Permission denied",
            errno.EROFS: "Read-only file system"}
CAUSE = {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied",
         errno.EROFS: "the file system is read-only"}  # what embedft says for each
ENV = "EMBEDFT_TEST_DISK"
REPO = Path(__file__).resolve().parents[2]


def target_name(path) -> str:
    """The name a written path will have in place: atomic's temporary `.NAME.tmp-xxxxxxxx` is NAME."""
    name = os.path.basename(os.fsdecode(path))
    m = re.fullmatch(r"\.(.+)\.tmp-[0-9a-f]{8}", name)
    return m.group(1) if m else name


@dataclass
class Point:
    at: str  # "model.safetensors", "probes.json", "state.pt", "records.jsonl", or a folder ("export") for a rename
    after: int | str = 0  # bytes put down before the fault; for a rename "before" or "after" it
    action: str = "fail"  # or "kill"
    code: int = errno.ENOSPC
    nth: int = 1  # the nth write of that name (sentence-transformers writes a README.md before embedft's card)
    seen: int = 0
    fired: bool = False

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    def reached(self, path) -> bool:
        """True once: at this point's nth write (or rename) of its name."""
        if self.fired or target_name(path) != self.at:
            return False
        self.seen += 1
        return self.seen == self.nth

    def fire(self, filename=None):
        self.fired = True
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(self.code, STRERROR[self.code], *([os.fsdecode(filename)] if filename else []))


class _FailingFile:
    """A file opened for writing that faults once `after` bytes (characters) are down, or at close."""

    def __init__(self, f, point: Point):
        self._f, self._point, self._written = f, point, 0

    def write(self, data):
        if self._written + len(data) > self._point.after:
            self._f.write(data[: max(0, self._point.after - self._written)])
            self._f.flush()
            self._point.fire()
        self._written += len(data)
        return self._f.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def close(self):
        if not self._point.fired:  # everything fitted in `after`: the disk fails when it is flushed
            self._f.flush()
            self._point.fire()
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                self.close()
        finally:
            self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def install(point: Point, setattr=setattr) -> Point:
    """Arm `point` in this process (`setattr`: pytest's monkeypatch.setattr, undone after the test)."""
    import embedft.atomic as atomic

    real_open = builtins.open
    real_replace, real_rename, real_exchange = os.replace, os.rename, atomic._exchange

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        writing = any(c in mode for c in "wax+")
        if writing and isinstance(file, (str, bytes, os.PathLike)) and isinstance(point.after, int) \
                and point.reached(file):
            return _FailingFile(f, point)
        return f

    def serialize_file(tensors, filename, metadata=None):
        if not isinstance(point.after, int) or not point.reached(filename):
            return real_serialize(tensors, filename, metadata=metadata)
        import safetensors

        with real_open(filename, "wb") as f:
            f.write(b"\0" * point.after)
        if point.action == "kill":
            point.fire()
        point.fired = True  # what safetensors raises: its own error type, the errno only in the text
        raise safetensors.SafetensorError(f"Error while serializing: I/O error: {STRERROR[point.code]} "
                                          f"(os error {point.code})")

    def renaming(real):
        def rename(src, dst, *args, **kwargs):
            if not isinstance(point.after, str) or not point.reached(dst):
                return real(src, dst, *args, **kwargs)
            if point.after == "before":
                point.fire(src)
            result = real(src, dst, *args, **kwargs)
            point.fire(src)
            return result

        return rename

    setattr(builtins, "open", open_)
    if point.at.endswith(".safetensors"):  # safetensors.torch imports torch: only where it is the point
        import safetensors.torch

        real_serialize = safetensors.torch.serialize_file
        setattr(safetensors.torch, "serialize_file", serialize_file)
    setattr(os, "replace", renaming(real_replace))
    setattr(os, "rename", renaming(real_rename))
    setattr(atomic, "_exchange", renaming(real_exchange))
    return point


def install_from_env() -> Point:
    """In a child process: arm the point the parent test put in EMBEDFT_TEST_DISK."""
    return install(Point(**json.loads(os.environ[ENV])))


def run_killed(at: str, after, code: str, cwd: Path, nth: int = 1) -> None:
    """Run `code` in a fresh interpreter that SIGKILLs itself at the point (at, after, nth); it must die there."""
    env = {**os.environ, ENV: Point(at, after, "kill", nth=nth).to_env(),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    res = subprocess.run([sys.executable, "-c", "from faults import disk\ndisk.install_from_env()\n" + code],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == -signal.SIGKILL, f"not killed at {at}/{after}: exit {res.returncode}\n{res.stderr[-3000:]}"


def visible(folder: Path) -> list[str]:
    """The names in `folder` besides the temporary siblings (.NAME.tmp-xxxxxxxx) a kill can leave, which nothing reads."""
    return sorted(p.name for p in folder.iterdir() if not re.fullmatch(r"\..+\.tmp-[0-9a-f]{8}", p.name))
