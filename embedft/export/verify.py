"""`embedft verify`: reload an export with plain sentence-transformers and repeat its parity check.

The same check `embedft export` runs before moving an export into place (`_parity`), against
the probe texts and reference vectors that ship with the export; an ONNX graph is checked too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from embedft.config import ExportConfig
from embedft.errors import ExportError
from embedft.export.parity import EXPORT_META, PROBE_EMB_FILE, PROBES_FILE, _looser, parity_figures, parity_summary


def read_probes(model_dir: str | Path) -> tuple[list[str], np.ndarray, dict[str, float]]:
    """An export's probe texts, their (2, N, D) reference vectors ([0] documents, [1] queries) and its
    saved tolerances; a folder that is not a whole export is an ExportError naming the fix."""
    d = Path(model_dir)
    if not d.is_dir():
        what = "is a file, not an export folder" if d.exists() else "does not exist"
        raise ExportError(f"{d} {what}; pass the folder `embedft export --out` wrote")
    for f in (PROBES_FILE, PROBE_EMB_FILE):
        if not (d / f).is_file():
            raise ExportError(f"{d}: missing {f}, so there is nothing to verify against; "
                              f"this is not an embedft export (re-export with `embedft export`)")
    probes = _saved(d / PROBES_FILE, lambda f: json.loads(f.read_text(encoding="utf-8")))
    ref = _saved(d / PROBE_EMB_FILE, np.load)
    if ref.ndim != 3 or ref.shape[0] != 2 or ref.shape[1] != len(probes):
        raise ExportError(f"{d / PROBE_EMB_FILE}: shape {ref.shape} does not match {len(probes)} probes "
                          f"(expected (2, {len(probes)}, dim)); re-export")
    saved = _saved(d / EXPORT_META, lambda f: json.loads(f.read_text())) if (d / EXPORT_META).is_file() else {}
    tol = dict(saved.get("tolerances") or {"min_cosine": ExportConfig.min_cosine, "max_abs_diff": ExportConfig.max_abs_diff})
    return probes, ref, tol


def verify_export(model_dir: str | Path, min_cosine: float | None = None, max_abs_diff: float | None = None,
                  device: str = "cpu") -> dict:
    """Reload an export with plain sentence-transformers and compare the probes with the saved reference vectors."""
    d = Path(model_dir)
    probes, ref, tol = read_probes(d)
    if min_cosine is not None:
        tol["min_cosine"] = min_cosine
    if max_abs_diff is not None:
        tol["max_abs_diff"] = max_abs_diff
    try:
        parity = _parity(d, probes, ref, tol, device)
    except Exception as e:  # transformers' and safetensors' errors (missing or truncated weights) name no fix
        raise ExportError(f"{d} cannot be loaded by sentence-transformers ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}); the export is damaged: copy it again or re-export") from e
    if not parity["ok"]:
        raise ExportError(f"{d} no longer matches its reference embeddings: {parity_summary(parity)}")
    from embedft.export.onnx import ONNX_FILE, ONNX_TOLERANCES, onnx_parity

    if (d / ONNX_FILE).is_file():
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            parity["onnx"] = {"ok": None, "skipped": "onnxruntime is not installed (pip install onnxruntime)"}
        else:
            try:
                parity["onnx"] = onnx_parity(d, probes, ref, _looser(tol, ONNX_TOLERANCES))
            except Exception as e:  # onnxruntime's own errors (a truncated or corrupt graph) name no file
                raise ExportError(f"{d / ONNX_FILE} cannot be run by onnxruntime ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300]}); re-export with --onnx") from e
            if not parity["onnx"]["ok"]:
                raise ExportError(f"{d / ONNX_FILE} no longer matches its reference embeddings: "
                                  f"{parity_summary(parity['onnx'])}")
    return parity


def _saved(path: Path, load):
    # One of embedft's own files of an export, read back; a damaged one is named, not a JSON or numpy traceback.
    try:
        return load(path)
    except (ValueError, OSError, EOFError) as e:
        raise ExportError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:300]}); the export is "
                          "damaged: copy it again or re-export") from e


def _parity(model_dir: Path, probes: list[str], ref: np.ndarray, tol: dict[str, float], device: str | None) -> dict:
    """Plain sentence-transformers load of model_dir vs the reference (2, N, D) vectors."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device=device)
    docs = model.encode(probes, normalize_embeddings=False, convert_to_numpy=True)
    queries = model.encode(probes, prompt_name="query", normalize_embeddings=False, convert_to_numpy=True)
    return parity_figures(ref, docs, queries, tol)
