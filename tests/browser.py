"""Helpers for the tests that use a real browser: headless Chromium (Debian's package, /usr/bin/chromium) driven by
Playwright, which is pointed at that browser and downloads none of its own.

`.ci/run` installs Chromium; where it or Playwright is missing, `chromium()` skips the test with a message that says
how to install them, or fails it where `DSLIB_BROWSER_TESTS=required` (as in CI).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import http.server
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

# Without the background-networking flags Chromium keeps trying hosts that this closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    """The system's Chromium: `DSLIB_CHROMIUM` when set, else chromium or chromium-browser on the PATH."""
    env = os.environ.get("DSLIB_CHROMIUM", "").strip()
    if env:
        return env if Path(env).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _missing(message: str) -> None:
    if os.environ.get("DSLIB_BROWSER_TESTS", "").strip().lower() == "required":
        pytest.fail(f"{message}; DSLIB_BROWSER_TESTS=required asks for the browser tests to run")
    pytest.skip(f"{message}: the browser tests are skipped")


def require_browser() -> str:
    """The path of the system's Chromium; skips the test (or fails it, where required) when Chromium or Playwright
    is not installed. Call it before costly set-up that only a browser test needs."""
    path = chromium_path()
    if path is None:
        _missing("headless Chromium is not installed (Debian: apt-get install chromium; or set DSLIB_CHROMIUM to a "
                 "Chromium binary)")
    if importlib.util.find_spec("playwright") is None:
        _missing("playwright is not installed (pip install -e '.[dev]')")
    return path


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium browser (a Playwright `Browser`), closed afterwards; skips the test when Chromium or
    Playwright is not installed (`require_browser`)."""
    path = require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve a folder over HTTP on 127.0.0.1 while the block runs; yields the base URL (ending in /)."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class PageWatch:
    """What went wrong on a page while it loaded: console errors, uncaught exceptions and failed requests."""

    def __init__(self, page: object) -> None:
        self.problems: list[str] = []
        page.on("console", lambda msg: msg.type == "error" and self.problems.append(f"console: {msg.text}"))
        page.on("pageerror", lambda err: self.problems.append(f"exception: {err}"))
        page.on("requestfailed", lambda req: self.problems.append(f"request failed: {req.url} ({req.failure})"))
