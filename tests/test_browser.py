"""A real browser: JupyterLab on localhost, notebook 06 run in headless Chromium, the inspector
rendered, a control changed, a screenshot saved. Needs Debian's chromium (.ci/run installs it)."""

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from medexgen_lib.paths import NOTEBOOKS_DIR

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyter_lab(tmp_path, trained_tiny):
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    pytest.importorskip("playwright")
    import papermill

    cfg = trained_tiny[0]
    overrides = {"paths.data_dir": cfg.paths.data_dir, "paths.output_dir": cfg.paths.output_dir,
                 "images.size": cfg.images.size, "text.max_length": cfg.text.max_length,
                 "eval.max_new_tokens": cfg.eval.max_new_tokens, "eval.num_beams": 1}
    papermill.execute_notebook(str(NOTEBOOKS_DIR / "06_visualization.ipynb"),
                               str(tmp_path / "06_visualization.ipynb"),
                               parameters={"overrides": overrides, "gallery_size": 2}, prepare_only=True)
    port, token = _free_port(), "medexgen-test"
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", f"--ServerApp.token={token}", f"--ServerApp.root_dir={tmp_path}",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("JupyterLab did not start within 60 s")
    yield f"{base}/lab/tree/06_visualization.ipynb?token={token}", cfg
    server.terminate()
    server.wait(timeout=30)


def trained_tiny_rows(cfg) -> list[dict]:
    from medexgen_lib.visualize import load_predictions
    return load_predictions(cfg.paths.logs, "test")


KERNEL_STATUS = """() => {
    const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const kernel = panel && panel.sessionContext && panel.sessionContext.session
        && panel.sessionContext.session.kernel;
    return kernel ? kernel.connectionStatus + "/" + kernel.status : "no kernel";
}"""


def _run_all_cells(page) -> None:
    """Run every cell once the notebook's kernel is connected and idle.

    Clicking menus before the session is ready makes JupyterLab ask for a kernel
    (seen on a fresh machine), so this waits for the kernel and uses the command registry.
    """
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget", timeout=60_000)
    page.wait_for_function(f"() => ({KERNEL_STATUS})() === 'connected/idle'", timeout=120_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")


def _wait_for_inspector(page, seconds: float = 300) -> str:
    """The inspector's header text, once rendered (JupyterLab draws cells only when scrolled to)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        page.locator(".jp-WindowedPanel-outer").first.evaluate("el => el.scrollTop = el.scrollHeight")
        headers = [t for t in page.locator(".widget-html-content").all_inner_texts() if " shown, " in t]
        if headers:
            return headers[0]
        page.wait_for_timeout(1000)
    dialogs = page.locator(".jp-Dialog").all_inner_texts()
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    raise AssertionError(f"the inspector did not render in {seconds:.0f} s; kernel: "
                         f"{page.evaluate(KERNEL_STATUS)}; dialogs: {dialogs}; errors: {errors[-3:]}")


def test_inspector_renders_and_reacts_in_chromium(jupyter_lab):
    from playwright.sync_api import sync_playwright

    url, cfg = jupyter_lab
    screenshot = Path(cfg.paths.logs) / "browser_inspector.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.on("pageerror", lambda error: print("page error:", error))
        try:
            _run_all_cells(page)
            before = _wait_for_inspector(page)
        except Exception:
            page.screenshot(path=str(screenshot), full_page=True)  # to see what went wrong
            raise
        order = page.locator("select").filter(has=page.locator("option", has_text="worst BLEU-4 first")).first
        order.select_option("worst BLEU-4 first")
        page.wait_for_timeout(2000)
        after = _wait_for_inspector(page)
        page.locator(".widget-html-content", has_text=" shown, ").first.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.screenshot(path=str(screenshot))
        browser.close()
    rows = trained_tiny_rows(cfg)
    worst = min(rows, key=lambda r: r["BLEU-4"])["uid"]  # min keeps the first of ties, as the sort does
    assert before.split()[0] == rows[0]["uid"]
    assert after.split()[0] == worst
    assert screenshot.stat().st_size > 20_000
