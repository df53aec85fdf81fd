"""The MLflow UI of a small embedft sweep, opened in headless Chromium.

Shared by `make ui-check` (tests/test_ui_browser.py: what a user sees, checked) and
`make ui-screenshots` (tools/ui_screenshots.py: the pictures in docs/mlflow-ui.md). Everything
is offline: a tiny random BERT (embedft_testing.synthetic), the sample data in data/, a SQLite store
and `mlflow server` on 127.0.0.1 in a temporary folder. The browser is the system's Chromium
(Debian: `apt-get install chromium`; or set EMBEDFT_CHROMIUM), driven by Playwright.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ENV = "EMBEDFT_CHROMIUM"
EXPERIMENT = "default"  # experiments/default.yaml's name, as `make train` tracks it
VIEWPORT = {"width": 1600, "height": 900}
RUN_NAME_CELL = '[col-id="attributes.`Run Name`"]'


def chromium_path() -> str | None:
    """$EMBEDFT_CHROMIUM, else the first Chromium on PATH."""
    if os.environ.get(CHROMIUM_ENV):
        return os.environ[CHROMIUM_ENV] if Path(os.environ[CHROMIUM_ENV]).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def browser_missing() -> str | None:
    """Why the UI cannot be opened here (None when it can)."""
    import importlib.util

    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (pip install -e '.[dev]', which `make setup` runs)"
    if chromium_path() is None:
        where = os.environ.get(CHROMIUM_ENV)
        return (f"{CHROMIUM_ENV}={where} is not a file" if where else
                "no Chromium on PATH (Debian/Ubuntu: apt-get install chromium; or set EMBEDFT_CHROMIUM)")
    return None


# ---------------------------------------------------------------------------------------
# A store made by embedft itself


@dataclass
class Store:
    """What build_store tracked: the SQLite file, the experiment and its runs by name."""

    db: Path
    experiment_id: str
    run_ids: dict[str, str] = field(default_factory=dict)  # run name -> run id
    sweep_parent: str = ""
    sweep_children: list[str] = field(default_factory=list)  # run names, in training order

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.db}"


def build_store(root: Path, model_dir: Path | None = None, steps: int = 6,
                sweep: tuple[str, ...] = ("train.lr=1e-3,1e-2",)) -> Store:
    """Train as a user would: experiments/default.yaml twice, then a --sweep, all on a tiny model,
    tracked to root/mlflow.db (run folders under root/runs)."""
    from mlflow import MlflowClient

    from embedft.config import load_config
    from embedft.recipes.sweep import run_sweep
    from embedft.recipes.train import run_train
    from embedft_testing.synthetic import tiny_bert

    root.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir or tiny_bert(root / "tiny-bert")
    db = root / "mlflow.db"
    config = REPO / "experiments" / "default.yaml"
    overrides = (f"model.name={model_dir}", f"data.train={REPO / 'data' / 'products.csv'}",
                 f"tracking.uri=sqlite:///{db}", f"train.output_dir={root / 'runs'}/{{name}}",
                 f"train.max_steps={steps}", "train.batch_size=8", "train.log_every=1", "eval.indexes=[]")
    for _ in range(2):  # the two `make train` runs
        run_train(load_config(config, overrides), progress=False)
    children = run_sweep(load_config(config, overrides), str(config), overrides, sweep, progress=False)
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    found = client.search_runs([exp.experiment_id])
    parent = next(r for r in found if r.data.tags.get("embedft.sweep") == "parent")
    return Store(db=db, experiment_id=exp.experiment_id, run_ids={r.info.run_name: r.info.run_id for r in found},
                 sweep_parent=parent.info.run_name, sweep_children=[c["run_name"] for c in children])


# ---------------------------------------------------------------------------------------
# The server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(db: Path, timeout: float = 180) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 (a free port) over db; yields its address, and always stops it."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner or huey workers
    log_path = db.parent / f"mlflow-server-{port}.log"
    with open(log_path, "w") as log:
        # Its own process group: `mlflow server` runs uvicorn as a child, stopped with it.
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                cwd=db.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            address = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(f"{address}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
            yield address
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL what is left of it after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # children of the group that outlived its leader
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------
# The browser


@contextlib.contextmanager
def chromium_page(viewport: dict | None = None) -> Iterator:
    """A page of headless Chromium (the system's binary), closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            page = browser.new_page(viewport=viewport or VIEWPORT)
            page.set_default_timeout(60_000)
            # MLflow 3.17 opens its assistant panel (a third of the screen) on a first visit; a user closes it once.
            page.add_init_script("window.localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")
            yield page
        finally:
            browser.close()


def open_runs(page, url: str) -> dict:
    """Open url (an experiment link) and wait for its runs table; returns where the UI landed."""
    page.goto(url)
    page.wait_for_selector("[role=gridcell] a[href*='/runs/']", state="visible")  # a run's name, in either view
    return {"url": page.url, "heading": page.locator("h1, h2").first.inner_text().strip()}


def expand_parents(page) -> None:
    """Unfold every parent run (a sweep) so its children are rows of the table (and bars of the charts)."""
    buttons = page.locator('[role=gridcell] button[data-component-id*="runnamecellrenderer"]')
    for i in range(buttons.count()):
        buttons.nth(i).click()
    page.wait_for_timeout(500)


def runs_table(page) -> dict[str, dict[str, str]]:
    """The runs table as shown: {run id: {"name": run name, column id: cell text}} for each visible row."""
    rows: dict[str, dict[str, str]] = {}
    for row in page.locator("[role=row][row-id]").all():
        if not row.is_visible():
            continue
        cells = rows.setdefault(row.get_attribute("row-id"), {})
        for cell in row.locator("[role=gridcell][col-id]").all():
            col = cell.get_attribute("col-id")
            if col == "attributes.`Run Name`":
                cells["name"] = cell.locator("a").first.inner_text().strip()
            else:
                cells[col] = cell.inner_text().strip()
    return rows


def visible_headers(page) -> list[str]:
    return [h.inner_text().strip() for h in page.locator("[role=columnheader]").all() if h.is_visible()]


def chart_card(page, title: str):
    """The chart view's card whose title is title."""
    return page.get_by_text(title, exact=True).first.locator(
        "xpath=ancestor::*[.//*[contains(@class, 'js-plotly-plot')]][1]")


def compare_url(address: str, experiment_id: str, run_ids: list[str]) -> str:
    return (f"{address}/#/compare-runs?runs={json.dumps(run_ids)}&experiments={json.dumps([experiment_id])}"
            "&workflowType=machine_learning")


def compare_metrics(page, url: str) -> dict[str, list[str]]:
    """The compare page's Metrics table: {metric: [value text of each run, left to right]}, first rows only
    (the table is virtualised)."""
    page.goto(url)
    page.wait_for_selector("a[title='Plot chart']")
    grids = page.locator(".ReactVirtualized__Grid__innerScrollContainer").all()
    is_names = [g.locator("a[title='Plot chart']").count() > 0 for g in grids]
    names_grid = grids[is_names.index(True)]
    names = {_top(c): c.inner_text().strip() for c in names_grid.locator(":scope > div").all()}
    values: dict[str, list[tuple[float, str]]] = {}
    for grid, named in zip(grids, is_names):  # the values grid: cells on the names' rows, one column per run
        if named:
            continue
        for c in grid.locator(":scope > div").all():
            if _top(c) in names:
                values.setdefault(names[_top(c)], []).append((_left(c), c.inner_text().strip()))
        if values:
            break
    return {k: [t for _, t in sorted(v)] for k, v in values.items()}


def _top(cell) -> float:
    return cell.evaluate("n => n.offsetTop")


def _left(cell) -> float:
    return cell.evaluate("n => n.offsetLeft")
