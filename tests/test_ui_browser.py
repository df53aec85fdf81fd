"""The MLflow UI of runs embedft tracked, in a real browser (headless Chromium, MLflow 3.17's UI).

GitHub issue 34: an experiment opened on the GenAI overview, two trains were both called
`default`, and the figures that matter were nowhere in sight. A small sweep is trained with a
tiny model, `mlflow server` serves it on 127.0.0.1, and the page is read as a user sees it.
Skips when Chromium or Playwright is absent, unless EMBEDFT_REQUIRE_BROWSER=1 (`make ui-check`).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
from conftest import REPO

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _ui_browser():
    spec = importlib.util.spec_from_file_location("ui_browser", REPO / "tools" / "ui_browser.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ui_browser"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


ui = _ui_browser()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_bert_dir):
    missing = ui.browser_missing()
    if missing:
        if os.environ.get("EMBEDFT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser check cannot run: {missing}")
        pytest.skip(f"no browser to check the MLflow UI with: {missing}")
    store = ui.build_store(tmp_path_factory.mktemp("ui-store"), tiny_bert_dir)
    with ui.mlflow_server(store.db) as address, ui.chromium_page() as page:
        yield store, address, page


def test_the_experiment_link_opens_on_its_runs_with_distinct_names_and_key_figure_columns(served):
    from mlflow import MlflowClient

    from embedft.tracking import ui as mlflow_ui

    store, address, page = served
    landed = ui.open_runs(page, mlflow_ui.runs_url(address, store.experiment_id))
    # MLflow 3.17 sends a plain experiment link to the GenAI "Overview" (traces); this one shows the runs.
    assert f"/experiments/{store.experiment_id}/runs" in landed["url"] and "/overview" not in landed["url"]
    assert landed["heading"] == "Runs"
    assert page.get_by_text("Model training", exact=True).first.is_visible()
    ui.expand_parents(page)
    rows = ui.runs_table(page)
    names = [r["name"] for r in rows.values()]
    assert sorted(names) == sorted(store.run_ids) and len(set(names)) == len(names) == 5
    assert {"default", "default-2", "default-sweep", *store.sweep_children} == set(names)
    # The key figures are columns, next to the names, with each run's own values.
    headers = ui.visible_headers(page)
    for key in ("_key/recall_at_10", "_key/recall_at_10_gain", "_key/macro_f1", "_key/macro_f1_gain"):
        assert key in headers
    client = MlflowClient(tracking_uri=store.uri)
    for run_id, cells in rows.items():
        logged = client.get_run(run_id).data.metrics
        assert float(cells["metrics.`_key/recall_at_10`"]) == pytest.approx(logged["_key/recall_at_10"], abs=1e-6)
        assert float(cells["metrics.`_key/macro_f1_gain`"]) == pytest.approx(logged["_key/macro_f1_gain"], abs=1e-6)


def test_the_chart_view_starts_with_the_key_figures_as_bars(served):
    from embedft.tracking import ui as mlflow_ui

    store, address, page = served
    ui.open_runs(page, mlflow_ui.runs_url(address, store.experiment_id) + "&compareRunsMode=CHART")
    ui.expand_parents(page)
    card = ui.chart_card(page, "_key/recall_at_10")
    card.locator(".js-plotly-plot").wait_for()
    box = card.bounding_box()
    assert box is not None and box["y"] + box["height"] <= ui.VIEWPORT["height"]  # in sight without scrolling
    assert card.locator(".barlayer .point").count() == 5  # one bar per run, not a one-point line
    assert card.locator(".scatterlayer .trace").count() == 0


def test_the_compare_page_shows_two_runs_key_figures_side_by_side(served):
    from mlflow import MlflowClient

    store, address, page = served
    pair = [store.run_ids[n] for n in store.sweep_children[:2]]
    shown = ui.compare_metrics(page, ui.compare_url(address, store.experiment_id, pair))
    # The metrics table is alphabetical: the _key/ figures are its first rows.
    assert list(shown)[:4] == ["_key/macro_f1", "_key/macro_f1_gain", "_key/recall_at_10", "_key/recall_at_10_gain"]
    client = MlflowClient(tracking_uri=store.uri)
    logged = [client.get_run(r).data.metrics for r in pair]
    for key in list(shown)[:4]:
        assert len(shown[key]) == 2
        for text, metrics in zip(shown[key], logged):  # the page rounds to 3 decimals
            assert float(text) == pytest.approx(metrics[key], abs=6e-4)
