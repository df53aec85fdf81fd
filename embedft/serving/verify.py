"""`embedft verify EXPORT --server URL --served-model NAME`: does a running server give the export's vectors?

The export's probe texts are sent to the server's /v1/embeddings as documents and as queries
(`input_type: "query"`), and compared with the reference vectors saved in the export under the
export's own tolerances, as `embedft verify` compares a plain sentence-transformers load.
Only the standard library talks HTTP here, so any embedft install can check a server.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from embedft.errors import ExportError
from embedft.export.parity import parity_figures, parity_summary
from embedft.export.verify import read_probes

CHUNK = 32  # probes per request: under any sensible --max-inputs


def verify_server(export_dir: str | Path, url: str, model: str, api_key: str | None = None,
                  min_cosine: float | None = None, max_abs_diff: float | None = None, timeout: float = 120.0) -> dict:
    """Parity figures of the server's vectors for `model` against the export's probes; ExportError when they differ."""
    probes, ref, tol = read_probes(export_dir)
    if min_cosine is not None:
        tol["min_cosine"] = min_cosine
    if max_abs_diff is not None:
        tol["max_abs_diff"] = max_abs_diff
    docs = embed_remote(url, model, probes, "document", api_key, timeout)
    queries = embed_remote(url, model, probes, "query", api_key, timeout)
    parity = parity_figures(ref, docs, queries, tol)
    if not parity["ok"]:
        raise ExportError(f"the server at {url} (model {model!r}) does not give the vectors of {export_dir}: "
                          f"{parity_summary(parity)}; is {model!r} the adapter this export was made from?")
    return parity


def embed_remote(url: str, model: str, texts: list[str], input_type: str = "document", api_key: str | None = None,
                 timeout: float = 120.0) -> np.ndarray:
    """(N, D) float32 vectors of `texts` from an `embedft serve` (or any OpenAI-compatible) server."""
    endpoint = url.rstrip("/") + ("/embeddings" if url.rstrip("/").endswith("/v1") else "/v1/embeddings")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    out = []
    for i in range(0, len(texts), CHUNK):
        body = json.dumps({"model": model, "input": texts[i:i + CHUNK], "encoding_format": "base64",
                           "input_type": input_type}).encode()
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                data = json.loads(resp.read())["data"]
        except urllib.error.HTTPError as e:
            raise ExportError(f"the server at {url} refused the probes ({e.code}): {_message(e)}") from e
        except (urllib.error.URLError, OSError) as e:
            raise ExportError(f"cannot reach a server at {url} ({e}); start it with `embedft serve` or fix --server")
        rows = sorted(data, key=lambda r: r["index"])
        out += [np.frombuffer(base64.b64decode(r["embedding"]), dtype="<f4") for r in rows]
    return np.stack(out).astype(np.float32)


def _message(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read())["error"]["message"]
    except Exception:  # not an OpenAI-shaped error body: show it raw
        return str(e.reason)
