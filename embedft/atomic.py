"""Artifacts appear whole or not at all: write into a temporary sibling, then swap it in.

Every file embedft writes itself goes through `write_bytes` (artifacts are serialised in memory
first), so a failing disk is one `WriteError` naming the path, the cause and the fix, and a fault
injected there (tests/faults) reaches every writer.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from embedft.errors import WriteError

log = logging.getLogger(__name__)


def _temp_path(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"


def temp_sibling(out: Path) -> Path:
    """A fresh hidden folder next to `out` (same filesystem, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(out)
    tmp.mkdir()
    return tmp


class _Swept(Exception):
    """A temporary was removed by `sweep_leftovers` before its writer could hold it: make another."""


def _hold_new(tmp: Path) -> int | None:
    """Hold the temporary its writer has just made at `tmp` (a folder or a file) until the returned descriptor
    is closed, after the temporary is moved into place or removed: `sweep_leftovers` leaves it alone meanwhile.
    None where there are no locks (no fcntl, a file system without them); then nothing is swept either."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(tmp, os.O_RDONLY)
    except FileNotFoundError:
        raise _Swept from None
    except PermissionError:  # a umask that leaves the owner no read: no sweep can open it either
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(tmp).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):  # a sweep holds it or has removed it
        pass
    except OSError:  # ENOLCK
        os.close(fd)
        return None
    os.close(fd)
    raise _Swept


def sweep_leftovers(out: Path) -> None:
    """Remove the temporaries of `out` (`.NAME.tmp-xxxxxxxx` beside it) that no running writer holds: those
    of a writer killed before it could clean up (SIGKILL, out of memory, a lost machine), which can be an
    export's or an index's size. A writer holds its temporary (`_hold_new`) until it is in place or removed,
    and the kernel drops the hold when its process dies. Nothing is removed where holds cannot be had.
    The old folder that `replace_dir`'s two-rename fallback moved aside (`.NAME.old-xxxxxxxx`, held the same
    way) goes too, or back to `out` when its writer died before the new one was in place."""
    try:
        names = os.listdir(out.parent)
    except OSError:
        return
    leftover = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-[0-9a-f]{{8}}")
    for name in names:
        m = leftover.fullmatch(name)
        if m is None:
            continue
        kind, path = m.group(1), out.parent / name
        fd = _try_hold(path)
        if fd is None:  # a running writer holds it, or the file system cannot tell
            continue
        try:
            if kind == "old" and not os.path.lexists(out):
                os.replace(path, out)
                log.warning("restored %s from %s: its writer ended between moving it aside and putting the new "
                            "one in place", out, path)
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            log.info("removed %s, left by a writer of %s that ended without cleaning up", path, out)
        finally:
            os.close(fd)


def _held_temp_dir(out: Path) -> tuple[Path, int | None]:
    """`temp_sibling`, held (`_hold_new`), after sweeping `out`'s leftovers."""
    sweep_leftovers(out)
    while True:
        tmp = temp_sibling(out)
        with contextlib.suppress(_Swept):
            return tmp, _hold_new(tmp)


def out_dir_problem(out: Path, overwrite: bool) -> str | None:
    """Why no folder can be swapped in at `out` (`--out`), as a message with the fix, or None; checked
    before the work: a file there, a non-empty folder without `overwrite`, no permission or a read-only
    disk (a temporary sibling is made and removed)."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; pass a folder"
    if out.exists() and any(out.iterdir()) and not overwrite:
        return f"{out} already exists; pass --overwrite (overwrite=True from Python) to replace it"
    try:
        probe = temp_sibling(out)
        with contextlib.suppress(FileNotFoundError):  # a sweep of another writer of `out` took it meanwhile
            probe.rmdir()
    except OSError as e:
        return f"--out {out}: cannot write there ({e.strerror}: {e.filename}); choose another --out"
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_files(folder: Path) -> None:
    """Give every file under `folder` the mode open() would (0666 less the umask). safetensors >= 0.8
    writes its files 0600, so adapters and exports could not be read by the team they are for."""
    mode = 0o666 & ~_umask()
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(mode)


@functools.cache
def _renameat2():
    import ctypes

    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the C library or the file
    system cannot (then the caller falls back to two renames)."""
    import ctypes

    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def replace_dir(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`, replacing an existing `out`: in one step where the file system can swap two
    folders, so a process killed at any point leaves the old `out` or the new one; elsewhere the old one is
    moved aside first and restored if the swap fails. Its files get the umask's permissions (`share_files`)."""
    share_files(tmp)
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):  # tmp now holds the old folder
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # rename() cannot replace a non-empty folder: move the old one aside first, held (as a temporary is) so
    # that no sweep takes it meanwhile; a writer killed in between leaves it for the next write to put back.
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    held = _try_hold(out)
    try:
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if held is not None:
            os.close(held)


def _try_hold(path: Path) -> int | None:
    """An exclusive hold on what is at `path` (it moves with it; a symbolic link is not followed), or None where
    none can be had: no locks here, another process holds it, or it cannot be opened."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:
        os.close(fd)
        return None


def place_new_dir(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out` only while `out` is absent or empty: rename() refuses a non-empty folder, so a
    folder that appeared since the caller checked (another process writing it) is kept. FileExistsError
    then, and `tmp` is left to the caller. Its files get the umask's permissions (`share_files`)."""
    share_files(tmp)
    try:
        os.rename(tmp, out)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(f"{out} appeared meanwhile and is not empty; pass --overwrite (overwrite=True "
                                  f"from Python) to replace it") from e
        raise


# errno -> what the user reads; each is a state of the disk, not a bug.
_CAUSES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EROFS: "the file system is read-only"}


def write_error(path: Path, e: OSError, fix: str = "") -> WriteError:
    """A WriteError for an OSError raised while writing `path`: the path, the cause, and the fix."""
    cause = _CAUSES.get(e.errno or 0, e.strerror or str(e))
    fix = fix or ("free space there or write elsewhere" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                  else "write to a folder you can write")
    err = WriteError(f"cannot write {path}: {cause}; {fix}")
    err.errno, err.path = e.errno, path  # not .filename: OSError's str() would then show errno and path alone
    return err


def disk_fix(code: int | None, elsewhere: str) -> str:
    """What to do about a disk that refused a write: free space, or go `elsewhere` (e.g. "pass another --out")."""
    return f"free space there or {elsewhere}" if code in (errno.ENOSPC, errno.EDQUOT) else \
        f"{elsewhere} (a folder you can write)"


# An errno written into a message: by Rust libraries (safetensors, tokenizers; Display, then Debug) and in the
# OSErrors that shutil.Error collects from a copytree.
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)|\[Errno (\d+)\]")


def disk_errno(e: BaseException) -> int | None:
    """The errno of a disk that refused a write (no space, quota, no permission, read-only) behind `e`, else None:
    an OSError's own, or the one its message carries (Rust libraries, shutil.Error)."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        m = _ERRNO_IN_TEXT.search(str(e))
        code = int(next(g for g in m.groups() if g)) if m else None
    return code if code in _CAUSES else None


@contextlib.contextmanager
def writing_into(tmp: Path, out: Path, elsewhere: str, kept: str = "") -> Iterator[None]:
    """Around every write into `tmp`, the temporary folder that becomes `out` (embedft's own files and those a
    library writes: sentence-transformers, peft, safetensors, torch.onnx): a disk that refuses one is a
    WriteError naming the file as it would be in `out` (the folder when the library does not say which), the
    cause, the fix (free space or go `elsewhere`) and `kept`. The caller removes `tmp`."""
    try:
        yield
    except Exception as e:
        code = disk_errno(e)
        if code is None:
            raise
        named = getattr(e, "path", None) or (e.filename if isinstance(e, OSError) else None)
        path = Path(named) if named else out
        with contextlib.suppress(ValueError):
            path = out / path.relative_to(tmp)
        fix = disk_fix(code, elsewhere) + (f"; {kept}" if kept else "")
        raise write_error(path, OSError(code, os.strerror(code)), fix) from e


@contextlib.contextmanager
def building(out: Path, elsewhere: str, kept: str = "") -> Iterator[Path]:
    """A temporary sibling of `out` to build an artifact folder in, then swap in (`replace_dir`,
    `place_new_dir`) inside the block: a disk that refuses a write is a WriteError as in `writing_into`, and
    the temporary folder is removed however the block fails."""
    try:
        tmp, held = _held_temp_dir(out)
    except OSError as e:
        raise write_error(out, e, disk_fix(e.errno, elsewhere) + (f"; {kept}" if kept else "")) from e
    try:
        with writing_into(tmp, out, elsewhere, kept):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if held is not None:
            os.close(held)


def _write(f, data: bytes) -> None:
    # The one call that puts embedft's bytes on disk (a test makes it fail after N bytes).
    f.write(data)


def write_bytes(out: Path, data: bytes, fix: str = "") -> None:
    """Write `out` whole or not at all (a hidden temporary sibling renamed over it); a failing disk is a
    WriteError naming `out` and `fix`, and nothing of the new file stays."""
    write_chunks(out, [data], fix)


def write_chunks(out: Path, chunks: Iterable[bytes | memoryview], fix: str = "") -> None:
    """`write_bytes` of the concatenated chunks, made one at a time: a file larger than memory (an
    index's ids, a shard of vectors written from the array's own buffer) is never held whole."""
    tmp, held = _temp_path(out), None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(out)
        while True:
            with open(tmp, "xb") as f:
                with contextlib.suppress(_Swept):
                    held = _hold_new(tmp)
                    for data in chunks:
                        _write(f, data)
                    break
            tmp = _temp_path(out)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(out, e, fix) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if held is not None:
            os.close(held)


def write_text(out: Path, text: str, fix: str = "") -> None:
    """Write a text file whole or not at all (UTF-8; `write_bytes`)."""
    write_bytes(out, text.encode("utf-8"), fix)


LOCK_FILE = ".embedft.lock"  # in a run folder while a command writes there (`holding`)


@contextlib.contextmanager
def holding(folder: Path, command: str, fix: str, lock: Path | None = None) -> Iterator[None]:
    """Hold `folder` for one command: a second one started on it meanwhile (the same experiment name
    twice, say) is refused at once, before either interleaves checkpoints or adapters there.

    An advisory lock (flock) on LOCK_FILE in `folder`, or on `lock` (for a folder the command removes
    and makes again), which also names the holder (pid, host, command) for the message. The kernel
    drops the lock when its process dies, SIGKILL included, so a run killed without cleanup never
    blocks the next one (`--resume`). A file system without locks: a warning,
    and the command goes on unheld. Where there is no fcntl (Windows) nothing is held."""
    lock = lock or folder / LOCK_FILE
    fd = _take(lock, folder, command, fix)
    if fd is None:
        yield
        return
    try:
        try:  # who holds it, for the message a second command gets
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()} {command}".encode())
        except OSError as e:
            raise write_error(lock, e, fix) from e
        yield
    finally:
        lock.unlink(missing_ok=True)  # still held: a command that opened this file sees it is gone
        os.close(fd)


def _take(lock: Path, folder: Path, command: str, fix: str) -> int | None:
    """An open descriptor of `lock`, flock()ed; None where locks cannot be had."""
    try:
        import fcntl
    except ImportError:
        return None
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise write_error(lock, e, fix) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(folder, _read(lock), command, fix) from None
        except OSError as e:  # ENOLCK: a network file system without a lock service
            os.close(fd)
            log.warning("cannot lock %s (%s): nothing stops a second %s from writing there at once",
                        lock, e.strerror, command)
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed the file after we opened it: lock the new one


def _read(lock: Path) -> str:
    try:
        return lock.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _in_use(folder: Path, owner: str, command: str, fix: str) -> WriteError:
    # The holder wrote "pid host command": its own command, which may not be this one (an eval of a run
    # that a train is writing).
    parts = owner.split(" ", 2)
    holder, who = (parts[2], f": process {parts[0]} on {parts[1]}") if len(parts) == 3 else (command, "")
    return WriteError(f"{folder} is in use by {'another ' if holder == command else ''}{holder}{who}. "
                      f"Wait for it to end, or {fix}")
