"""A chapter in JupyterLab, in headless Chromium, as a reader meets it: the test starts `jupyter lab` on localhost,
opens chapter 01 (a copy, so that JupyterLab's autosave never touches the repository), runs every cell from the Run
menu, moves the explorer's slider with the keyboard and sees the explorer's output change. nbval runs the explorers
only in their static view; this is the test of the widgets themselves."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from browser import chromium, free_port, require_browser
from dslib.book import build_dir, find_root, load_book

ROOT = find_root(Path(__file__))
CHAPTER = "01"  # its explorer turns a compute budget into a model size: a slider, a plot and a printed table
RUN_TIMEOUT_S = 600


def _wait_for_server(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with status {process.returncode} before it served {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer {url} within {timeout:.0f} s")


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 whose root holds a copy of the chapter; yields (base URL, token, notebook
    path relative to the root, the copy's path)."""
    require_browser()
    chapter = load_book(ROOT).chapter(CHAPTER)
    work = tmp_path / "work"
    (work / "chapters").mkdir(parents=True)
    copy = work / chapter.notebook
    shutil.copy(ROOT / chapter.notebook, copy)
    token = secrets.token_hex(16)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DSLIB_STATIC"}  # the widgets, not the static view
    env.update(DSLIB_ROOT=str(ROOT), DSLIB_BUILD=str(tmp_path / "build"), DSLIB_SCALE="small",
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_DATA_DIR=str(tmp_path / "data"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"), IPYTHONDIR=str(tmp_path / "ipython"),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    # the kernels of this Python, wherever the data folder points
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(tmp_path / "kernels")],
                   check=True, capture_output=True, env=env)
    env["JUPYTER_PATH"] = str(tmp_path / "kernels" / "share" / "jupyter")
    log = open(tmp_path / "jupyterlab.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={work}", "--ServerApp.port_retries=0",
         "--allow-root", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}/"
    try:
        _wait_for_server(f"{base}api/status?token={token}", process)
        yield base, token, chapter.notebook, copy
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


# The notebook's cells, read from JupyterLab's own model (cells off screen may not be in the page).
_CELLS = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.content.model) return null;
  const cells = Array.from(panel.content.model.cells).filter(c => c.type === 'code');
  return {
    kernel: panel.sessionContext.session && panel.sessionContext.session.kernel
            ? panel.sessionContext.session.kernel.status : 'none',
    code: cells.length,
    done: cells.filter(c => c.executionCount !== null).length,
    errors: cells.flatMap(c => Array.from({length: c.outputs.length}, (_, i) => c.outputs.get(i).toJSON()))
                 .filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue),
  };
}"""


def test_a_chapter_runs_in_jupyterlab_and_its_explorer_redraws_when_the_slider_moves(lab):
    base, token, notebook, copy = lab
    committed = (ROOT / notebook).read_bytes()
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{base}lab/tree/{notebook}?token={token}")
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                               "&& window.jupyterapp.shell.currentWidget.sessionContext "
                               "&& window.jupyterapp.shell.currentWidget.sessionContext.session "
                               "&& window.jupyterapp.shell.currentWidget.sessionContext.session.kernel "
                               "&& window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status "
                               "=== 'idle'", timeout=120_000)
        # Run > Run All Cells, as a reader would
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        start = time.monotonic()
        page.wait_for_function(f"() => {{ const s = ({_CELLS})(); return s && s.done === s.code && "
                               f"s.kernel === 'idle'; }}", timeout=RUN_TIMEOUT_S * 1000, polling=1000)
        seconds = time.monotonic() - start
        state = page.evaluate(_CELLS)
        assert not state["errors"], f"cells raised in JupyterLab: {state['errors'][:3]}"
        print(f"chapter {CHAPTER}: {state['code']} code cells ran in JupyterLab in {seconds:.0f} s")

        explorer = page.locator(".widget-interact").first
        explorer.scroll_into_view_if_needed()
        output = explorer.locator(".jp-OutputArea, .widget-output").first
        page.wait_for_function("el => el.innerText.trim().length > 0", arg=output.element_handle(), timeout=60_000)
        slider = explorer.locator(".widget-slider").first
        readout = slider.locator(".widget-readout")
        before_value, before = readout.inner_text(), output.inner_text()
        before_image = explorer.locator("img").first.get_attribute("src")
        slider.locator(".noUi-handle").first.focus()
        for _ in range(8):
            page.keyboard.press("ArrowRight")
        page.wait_for_function("([el, text]) => el.innerText !== text && el.innerText.trim().length > 0",
                               arg=[output.element_handle(), before], timeout=60_000)
        after_value, after = readout.inner_text(), output.inner_text()
        after_image = explorer.locator("img").first.get_attribute("src")
        assert float(after_value) > float(before_value), (before_value, after_value)
        assert after != before
        assert after_image and after_image != before_image, "the explorer's plot was not redrawn"
        shots = build_dir(ROOT) / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        explorer.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / f"jupyterlab-{CHAPTER}-explorer.png"))
        print(f"explorer: slider {before_value} -> {after_value}; output changed")
    # the reader's copy was run; the repository's notebook is as it was
    assert (ROOT / notebook).read_bytes() == committed
