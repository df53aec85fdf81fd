"""The PriceRunner benchmark split (../shared/datasets/pricerunner): skipped where that folder is absent."""

import pytest
from conftest import REPO, SHARED_DATASETS

PRICERUNNER = SHARED_DATASETS / "pricerunner" / "pricerunner_aggregate.csv"


@pytest.mark.realdata
def test_untuned_minilm_reproduces_the_reference_figures(tmp_path):
    """Base all-MiniLM-L6-v2, exact search: offer-matching R_cap@10 0.498 and kNN (k=10) macro-F1 0.957, +-0.003.

    The benchmark protocol of the dataset's README (split by product, each offer queries the
    other test offers, recall denominator min(|positives|, 10) = R_cap, kNN over the train offers)
    as the experiment file configures it; a mistake in any of them moves these figures.
    """
    if not PRICERUNNER.is_file():
        pytest.skip(f"{PRICERUNNER} is absent (real data lives outside the repo)")
    from embedft.config import load_config
    from embedft.recipes.eval import run_eval

    cfg = load_config(REPO / "experiments" / "pricerunner-matching.yaml",
                      [f"data.train={PRICERUNNER}", "tracking.enabled=false", "eval.indexes=[]"])
    metrics = run_eval(cfg, base_only=True, out=str(tmp_path / "eval"), progress=False)["metrics"]
    assert metrics["base/retrieval/r_cap@10"] == pytest.approx(0.498, abs=0.003)  # called recall@10 before issue 29
    assert metrics["base/retrieval/recall@10"] <= metrics["base/retrieval/r_cap@10"]
    assert metrics["base/classification/macro_f1"] == pytest.approx(0.957, abs=0.003)
