"""Parity: the figures that prove an export embeds as the trained model did, and its probes.

The probes and their reference vectors ship with the export, so the check can be repeated
on any machine later; NaN or inf vectors always fail it.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from embedft.config import ExportConfig
from embedft.errors import ExportError

log = logging.getLogger(__name__)

EXPORT_META = "embedft_export.json"
PROBES_FILE = "probes.json"
PROBE_EMB_FILE = "probe_embeddings.npy"
# Reduced-precision weights cannot match fp32 to 1e-5; these are what a correct bf16/fp16
# export reaches on real models (bf16 keeps 8 mantissa bits, fp16 11).
REDUCED_TOLERANCES = {"bf16": {"min_cosine": 0.99, "max_abs_diff": 2e-2},
                      "fp16": {"min_cosine": 0.999, "max_abs_diff": 5e-3}}


# Varied short texts (products, questions, support, numbers, punctuation, other scripts,
# one longer than any max_length) so parity covers truncation and odd tokens.
DEFAULT_PROBES: tuple[str, ...] = (
    "apple iphone 8 plus 64gb silver",
    "samsung galaxy s21 ultra 5g 256gb phantom black",
    "sony bravia 55 inch 4k uhd smart led tv",
    "lg oled65c1 65\" oled tv",
    "bosch serie 6 washing machine 9kg 1400 rpm white",
    "hotpoint fridge freezer 70/30 frost free silver",
    "miele g 7100 sc dishwasher",
    "intel core i7-12700k processor box",
    "amd ryzen 9 5950x 16-core 3.4 ghz",
    "canon eos 250d dslr camera 24.1mp",
    "nikon z6 ii mirrorless body",
    "google pixel 7 pro 128gb",
    "tv",
    "a",
    "fridge",
    "cpu",
    "How do I reset my password?",
    "where is my order",
    "I want a refund for a damaged item",
    "cancel my subscription please",
    "track delivery 123456789",
    "my card payment was declined twice",
    "how to change the account email address",
    "what is the best phone under 300 pounds",
    "which washer is the quietest",
    "is this tv compatible with hdmi 2.1",
    "Instruct: classify the product\nQuery: blue kettle",
    "query: cheap laptop",
    "passage: The quick brown fox jumps over the lazy dog.",
    "The Eiffel Tower is located in Paris.",
    "Photosynthesis converts light energy into chemical energy.",
    "The capital of Australia is Canberra, not Sydney.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Neural networks learn representations from data.",
    "A contrastive loss pulls positives together and pushes negatives apart.",
    "FAISS builds approximate nearest neighbour indexes.",
    "LoRA adds low-rank updates to frozen weights.",
    "1234567890",
    "3.14159 2.71828 1.41421",
    "£499.99 – 20% off!!!",
    "#1 best seller (2024) *** free shipping ***",
    "e-mail: support@example.com, tel. +44 20 7946 0000",
    "C++ / C# / F# developers",
    "<html><body>hello</body></html>",
    "   leading and trailing spaces   ",
    "UPPER CASE TEXT SHOULD STILL EMBED",
    "mIxEd CaSe ProDuct NaMe",
    "新しいスマートフォン",
    "Смартфон с хорошей камерой",
    "téléviseur écran plat 4k",
    "Waschmaschine mit Trockner",
    "teléfono móvil libre",
    "emoji 😀 👍 test",
    "tab\tseparated\tvalues",
    "line one\nline two",
    "repeat repeat repeat repeat repeat",
    "ok",
    "no",
    "yes please",
    "white goods",
    "kitchen appliances and small electricals",
    "gaming laptop with rtx 4070 and 32gb ram",
    "noise cancelling wireless headphones",
    " ".join(["long product description with many repeated words to exceed the maximum sequence length"] * 40),
)






def _probe_list(probe_texts: Sequence[str] | None, n: int) -> list[str]:
    probes = list(probe_texts) if probe_texts is not None else list(DEFAULT_PROBES[:n])
    bad = [i for i, t in enumerate(probes) if not isinstance(t, str) or not t.strip()]
    if not probes or bad:
        raise ExportError(f"probe_texts must be non-empty strings; bad entries at {bad[:10] or 'all (empty list)'}")
    return probes


def _tolerances(dtype: str, cfg: ExportConfig) -> dict[str, float]:
    if dtype == "fp32":
        return {"min_cosine": cfg.min_cosine, "max_abs_diff": cfg.max_abs_diff}
    loose = REDUCED_TOLERANCES[dtype]
    # A config looser than the dtype's default wins; a stricter one cannot be met in reduced precision.
    return {"min_cosine": min(cfg.min_cosine, loose["min_cosine"]), "max_abs_diff": max(cfg.max_abs_diff, loose["max_abs_diff"])}


def compare_embeddings(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Row-wise cosine and element-wise absolute difference between two (N, D) arrays."""
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        return {"min_cosine": float("nan"), "max_abs_diff": float("inf"), "mean_cosine": float("nan")}
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    # Two zero vectors agree; a row with a NaN or inf keeps a NaN cosine, so it fails the check.
    with np.errstate(invalid="ignore"):
        cos = np.where(norms == 0, 1.0, (ref * got).sum(1) / np.maximum(norms, 1e-30))
    return {"min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(ref - got).max()),
            "mean_cosine": float(cos.mean())}




def parity_figures(ref: np.ndarray, docs: np.ndarray, queries: np.ndarray, tol: dict[str, float]) -> dict:
    """Compare (N, D) document and query vectors with the reference (2, N, D) under a tolerance."""
    per = {"documents": compare_embeddings(ref[0], docs), "queries": compare_embeddings(ref[1], queries)}
    # np.min/np.max carry a NaN; Python's min/max keep the first value when the other is NaN.
    min_cos = float(np.min([v["min_cosine"] for v in per.values()]))
    max_abs = float(np.max([v["max_abs_diff"] for v in per.values()]))
    ok = bool(min_cos >= tol["min_cosine"] and max_abs <= tol["max_abs_diff"])  # NaN compares False
    return {"ok": ok, "min_cosine": min_cos, "max_abs_diff": max_abs, **per, "tolerances": dict(tol),
            "n_probes": int(ref.shape[1])}


def _looser(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {"min_cosine": min(a["min_cosine"], b["min_cosine"]), "max_abs_diff": max(a["max_abs_diff"], b["max_abs_diff"])}


def parity_summary(parity: dict) -> str:
    """One line of parity figures against their tolerances, for messages and logs."""
    t = parity["tolerances"]
    return (f"min cosine {parity['min_cosine']:.7f} (need >= {t['min_cosine']}), max abs diff "
            f"{parity['max_abs_diff']:.3g} (need <= {t['max_abs_diff']:.3g}) over {parity['n_probes']} probes "
            f"as documents and queries")
