"""05_embedding_views in a real JupyterLab driven by Debian's Chromium (Playwright; never `playwright install`).

JupyterLab serves a copy of the notebook on 127.0.0.1 with tiny parameters; the test runs every cell from
the Run menu, waits for the UMAP scatter's points in the page, switches the explorer's "colour by" dropdown
and checks that the figure changed, then saves a screenshot (also to runs/screenshots/ for the README).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from browser_support import CHROMIUM_FLAGS, chromium_path, jupyterlab

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_embedding_views.ipynb"
TINY = {"PATIENTS": "150", "SEED": "0", "EPOCHS": "8", "SAMPLE": "300"}

# The explorer's plot: the plotly figure that lives inside a widget (other figures are plain outputs).
EXPLORER_STATE = """() => {
  const plot = [...document.querySelectorAll('.js-plotly-plot')].find(p => p.closest('.jupyter-widgets'));
  if (!plot) return null;
  const fills = [...plot.querySelectorAll('.scatterlayer .point')].map(p => p.style.fill);
  return {traces: plot.querySelectorAll('.scatterlayer .trace').length, points: fills.length,
          colours: [...new Set(fills)].sort().join('|'), title: (plot.querySelector('.gtitle') || {}).textContent || ''};
}"""


def accept_kernel_dialog(page, api, wait_ms: int = 5000) -> None:
    """JupyterLab sometimes asks which kernel to start (a race at start-up): accept the proposed one."""
    try:
        page.locator(".jp-Dialog .jp-mod-accept").click(timeout=wait_ms)
    except api.TimeoutError:
        pass  # no dialog: the kernel started on its own


STARTED = "() => [...document.querySelectorAll('.jp-InputArea-prompt')].some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))"


def run_all_cells(page, api, attempts: int = 4) -> None:
    """Run > Run All Cells, again if no cell started: a click that lands while the kernel is still connecting
    is dropped by JupyterLab (sometimes after asking which kernel to start)."""
    for _ in range(attempts):
        accept_kernel_dialog(page, api, wait_ms=2000)
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        accept_kernel_dialog(page, api)
        try:
            page.wait_for_function(STARTED, timeout=20_000)
            return
        except api.TimeoutError:
            continue
    raise AssertionError("Run All Cells never started a cell")


def test_embedding_explorer_renders_and_reacts_in_jupyterlab(tmp_path):
    chromium = chromium_path()
    if chromium is None:
        pytest.skip("NOTICE: Chromium not found (Debian: apt-get install chromium); browser test skipped")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)  # JupyterLab may save outputs into the file it serves
    # Render every cell (JupyterLab 4 virtualises long notebooks: off-screen outputs may not be in the DOM).
    settings = tmp_path / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false"})
    )  # no news toast
    # CI containers run as root, which jupyter_server refuses without allow_root (set through a config dir).
    config = tmp_path / "config"
    config.mkdir()
    (config / "jupyter_server_config.json").write_text(json.dumps({"ServerApp": {"allow_root": True}}))
    env = {f"EHRCLIP_NB_{k}": v for k, v in TINY.items()}
    env.update(EHRCLIP_NB_OUT=str(tmp_path / "out"), JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"), JUPYTER_CONFIG_DIR=str(config))  # fmt: skip

    with jupyterlab(root, env) as served, playwright_api.sync_playwright() as p:
        url, token = served.split("|")
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
            run_all_cells(page, playwright_api)

            page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .scatterlayer .point').length > 0",
                                   timeout=360_000)  # fmt: skip
            page.wait_for_function(
                f"() => {{ const s = ({EXPLORER_STATE})(); return s && s.points > 0; }}", timeout=120_000
            )
            before = page.evaluate(EXPLORER_STATE)
            assert "label" in before["title"] and before["points"] >= 20

            colour_by = page.locator(
                ".widget-dropdown", has=page.locator("label", has_text="colour by")
            ).locator("select")
            colour_by.select_option("age")
            page.wait_for_function(
                f"() => {{ const s = ({EXPLORER_STATE})(); return s && s.title.includes('age') && s.points > 0; }}",
                timeout=60_000,
            )
            after = page.evaluate(EXPLORER_STATE)
            assert after["points"] == before["points"]  # same admissions, new colours
            assert (after["traces"], after["colours"]) != (before["traces"], before["colours"])

            page.locator(".jupyter-widgets .js-plotly-plot").first.scroll_into_view_if_needed()
            shot = tmp_path / "05_embedding_views.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            keep = ROOT / "runs" / "screenshots"
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, keep / shot.name)
        finally:
            browser.close()
