"""Serving fixtures: the tiny BERT and Qwen3 models with three adapters each, and their reference vectors."""

from __future__ import annotations

import pytest

from serving.serve_helpers import make_adapter, reference


@pytest.fixture(scope="session")
def family_models(tiny_bert_dir, tiny_qwen3_dir, tmp_path_factory):
    """Per family: the base folder, three adapters (different ranks and targets; one trained with a
    shorter max_length) and the reference vectors of each and of the base."""
    out = {}
    for fam, base in (("bert", tiny_bert_dir), ("qwen3", tiny_qwen3_dir)):
        root = tmp_path_factory.mktemp(f"serve-{fam}")
        q_v = ("query", "value") if fam == "bert" else ("q_proj", "v_proj")
        adapters = {"a1": make_adapter(base, root / "a1", seed=1, r=4),
                    "a2": make_adapter(base, root / "a2", seed=2, r=8, targets=q_v),
                    "a3": make_adapter(base, root / "a3", seed=3, r=2, max_length=16)}
        refs = {"base": reference(base, None)}
        for name, path in adapters.items():
            refs[name] = reference(base, path, max_length=16 if name == "a3" else 128)
        out[fam] = {"base": base, "adapters": adapters, "refs": refs}
    return out
