"""ONNX export: the whole embedding (transformer, pooling, normalisation) as one fp32 graph.

`embedft export --onnx` writes it as onnx/model.onnx inside the export folder and checks it
with onnxruntime against the same reference vectors as the sentence-transformers load;
`embedft verify` re-checks it when onnxruntime is installed. Needs onnx and onnxruntime (the `onnx` extra).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from embedft.atomic import disk_errno
from embedft.errors import ExportError
from embedft.export.parity import parity_figures, parity_summary

ONNX_PACKAGES = ("onnx", "onnxruntime")
ONNX_FILE = "onnx/model.onnx"
# onnxruntime fuses and reorders fp32 kernels, so it is held to 1e-4 rather than 1e-5.
ONNX_TOLERANCES = {"min_cosine": 0.9999, "max_abs_diff": 1e-4}


def require_onnx() -> None:
    """A clear error, before any model is loaded, when onnx or onnxruntime is not installed."""
    import importlib.util

    missing = [m for m in ONNX_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"--onnx needs {', '.join(missing)} (not installed): pip install {' '.join(missing)}")


def export_onnx(tmp: Path, probes: list[str], ref: np.ndarray, spec, tol: dict[str, float]) -> dict:
    """tmp/onnx/model.onnx: transformer, pooling and normalisation as one fp32 graph, checked with onnxruntime.

    Inputs `input_ids` and `attention_mask` (batch and length dynamic), as the export's own
    tokenizer makes them (padding side, EOS). Outputs `last_hidden_state`, which is what
    sentence-transformers' ONNX backend reads, and `sentence_embedding`, the finished vector
    for serving with onnxruntime alone. Exported with torch's TorchScript-based exporter,
    which needs only `onnx`; optimum (what sentence-transformers' own ONNX export uses) does
    not install beside transformers 5.
    """
    import torch
    from sentence_transformers import SentenceTransformer

    from embedft.modeling.encoder import pool

    class EmbeddingGraph(torch.nn.Module):
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            emb = pool(hidden, attention_mask, spec.pooling)
            return hidden, (torch.nn.functional.normalize(emb, dim=-1) if spec.normalize else emb)

    st = SentenceTransformer(str(tmp), device="cpu").float().eval()
    graph = EmbeddingGraph(st[0].auto_model).eval()
    example = _st_tokenize(st, probes[:8])  # mixed lengths: the trace sees padding
    path = tmp / ONNX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    dims = {0: "batch", 1: "sequence"}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns that Python tests on shapes become constants, and that indexing with
            # negative indices would export wrongly. The parity check below is the real test: it runs
            # other batch sizes, lengths and paddings through the graph and compares the vectors.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
            torch.onnx.export(graph, (example["input_ids"], example["attention_mask"]), str(path), dynamo=False,
                              input_names=["input_ids", "attention_mask"],
                              output_names=["last_hidden_state", "sentence_embedding"],
                              dynamic_axes={"input_ids": dims, "attention_mask": dims, "last_hidden_state": dims,
                                            "sentence_embedding": {0: "batch"}},
                              opset_version=17)
    except Exception as e:  # the exporter raises many types for operators it cannot express
        code = disk_errno(e)
        if code is not None:  # a full or read-only disk, not an operator: named as this file (atomic.writing_into)
            raise OSError(code, os.strerror(code), str(path)) from e
        raise ExportError(f"ONNX export is not supported for model type {spec.model_type!r} ({spec.family} family) "
                          f"by torch.onnx {torch.__version__}: {type(e).__name__}: {e}; export without --onnx") from e
    parity = onnx_parity(tmp, probes, ref, tol, st)
    if not parity["ok"]:
        raise ExportError(f"ONNX parity check failed for {spec.model_type!r}: {parity_summary(parity)}")
    return parity


def _st_tokenize(st, texts: list[str]) -> dict:
    """The model's own tokenisation (`preprocess` in sentence-transformers >= 6, `tokenize` before)."""
    return st.preprocess(texts) if hasattr(st, "preprocess") else st.tokenize(texts)


def onnx_parity(model_dir: Path, probes: list[str], ref: np.ndarray, tol: dict[str, float], st=None) -> dict:
    """onnx/model.onnx run by onnxruntime, fed by the export's own tokenizer, vs the reference vectors."""
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer

    st = st or SentenceTransformer(str(model_dir), device="cpu")
    session = ort.InferenceSession(str(model_dir / ONNX_FILE), providers=["CPUExecutionProvider"])

    def run(texts: list[str]) -> np.ndarray:
        f = _st_tokenize(st, texts)
        return session.run(["sentence_embedding"], {"input_ids": f["input_ids"].numpy(),
                                                    "attention_mask": f["attention_mask"].numpy()})[0]

    prompt = st.prompts.get("query") or ""
    return parity_figures(ref, run(probes), run([prompt + t for t in probes]), tol)
