"""Screenshots of the MLflow UI for docs/mlflow-ui.md, made from a sweep embedft trains here.

    make ui-screenshots            # or: python tools/ui_screenshots.py --out docs

Trains experiments/default.yaml twice and a 2x2 --sweep on a tiny random model (offline, a few
minutes on 2 CPU cores), serves the store with `mlflow server` on 127.0.0.1 and photographs, in
headless Chromium (the system's; tools/ui_browser.py): the runs table, the chart view of the
sweep and the compare page of two sweep points. The figures are a tiny random model's: the
pictures show the layout, not a result.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ui_browser as ui  # noqa: E402

SHOTS = ("mlflow-ui-runs.png", "mlflow-ui-charts.png", "mlflow-ui-compare.png")


def take(store: ui.Store, address: str, out: Path) -> list[Path]:
    """The three pictures, written to out."""
    from embedft.tracking import ui as mlflow_ui

    out.mkdir(parents=True, exist_ok=True)
    runs, charts, compare = (out / name for name in SHOTS)
    with ui.chromium_page() as page:
        ui.open_runs(page, mlflow_ui.runs_url(address, store.experiment_id))
        ui.expand_parents(page)
        page.screenshot(path=str(runs))

        ui.open_runs(page, mlflow_ui.runs_url(address, store.experiment_id) + "&compareRunsMode=CHART")
        ui.expand_parents(page)
        ui.chart_card(page, "_key/recall_at_10").locator(".js-plotly-plot").wait_for()
        page.wait_for_timeout(1000)  # the bars' entry animation
        page.screenshot(path=str(charts))

        pair = [store.run_ids[n] for n in store.sweep_children[:2]]
        ui.compare_metrics(page, ui.compare_url(address, store.experiment_id, pair))
        for section in ("Visualizations", "Parameters"):  # folded: the run names and the metrics in one picture
            page.get_by_text(section, exact=True).first.click()
        page.wait_for_timeout(500)
        page.screenshot(path=str(compare))
    return [runs, charts, compare]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs"), help="folder for the PNG files (default: docs)")
    p.add_argument("--steps", type=int, default=40, help="training steps per run (default: 40)")
    p.add_argument("--store", type=Path, help="keep the store here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    missing = ui.browser_missing()
    if missing:
        print(f"ui_screenshots: {missing}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="embedft-ui-") as tmp:
        root = args.store or Path(tmp)
        store = ui.build_store(root, steps=args.steps, sweep=("lora.r=4,16", "train.lr=1e-3,1e-2"))
        with ui.mlflow_server(store.db) as address:
            for path in take(store, address, args.out):
                print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
