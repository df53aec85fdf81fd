"""The identity of an export's weights: file stats (cheap) and a digest (exact); index manifests record both."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from embedft.errors import ExportError

log = logging.getLogger(__name__)


def _weight_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
    if not files:
        raise ExportError(f"{d}: no model weights (*.safetensors) found; is this a sentence-transformers folder?")
    return files


def weights_stat(model_dir: str | Path) -> dict[str, list[int]]:
    """The export's weight files as the file system sees them: name -> [size, mtime, ctime (ns), inode, device].

    Equal stats mean the very same files, unchanged (a write or a copy changes the ctime, which
    no user can set), so `weights_digest` need not read them again (`index search`)."""
    out = {}
    for f in _weight_files(model_dir):
        st = f.stat()
        out[f.name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    return out


def weights_digest(model_dir: str | Path) -> str:
    """First 16 hex of the sha256 over the export's weight files (identifies the model in index manifests)."""
    h = hashlib.sha256()
    for f in _weight_files(model_dir):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
