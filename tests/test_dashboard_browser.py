"""The dashboard in a real browser: headless Debian chromium driven by Playwright,
against the real CLI server on 127.0.0.1 while a live run appends logs.

`serve_dashboard` and `chromium_page` are reusable (e.g. with the real tiny
trainer writing the logs instead of LiveWriter).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest_dashboard import FakeRun, LiveWriter, loss_at

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("DASHBOARD_TEST_CHROMIUM", "/usr/bin/chromium")
# The test machine has no network: without these chromium keeps trying to reach Google.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

playwright_sync = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no chromium at {CHROMIUM}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, token: str | None, timeout: float = 30.0) -> None:
    request = urllib.request.Request(url + "/health")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dashboard exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("dashboard did not become healthy in time")


@contextlib.contextmanager
def serve_dashboard(logs_dir, output_dir=None, token: str | None = None, extra_args=()):
    """Run `training_dashboard.py` as a real server on a free port; yields its URL."""
    port = free_port()
    cmd = [sys.executable, str(REPO / "training_dashboard.py"), "--logs", str(logs_dir),
           "--host", "127.0.0.1", "--port", str(port), "--refresh", "1", *extra_args]
    if output_dir:
        cmd += ["--output-dir", str(output_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DASHBOARD_TOKEN", None)
    if token:
        env["DASHBOARD_TOKEN"] = token
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, token)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@contextlib.contextmanager
def chromium_page(width: int = 1440, height: int = 1000):
    """A headless Debian-chromium page (never a downloaded browser)."""
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


def shown_step(page) -> int | None:
    text = page.text_content("#stat-step").replace(",", "").strip()
    return int(text) if text.isdigit() else None


def wait_for_plots(page, timeout_ms: int = 30_000) -> None:
    page.wait_for_function(
        """() => [...document.querySelectorAll('img[data-plot]')]
                 .every(img => img.getAttribute('src') && img.complete && img.naturalWidth > 0)""",
        timeout=timeout_ms,
    )


def test_live_run_in_browser(tmp_path):
    fake = FakeRun(tmp_path / "run", total_steps=400)
    fake.start()
    for step in range(1, 41):
        fake.train(step, when=time.time() - (41 - step) * 0.3)
        if step % 5 == 0:
            fake.experts(step)
        if step % 10 == 0:
            fake.evaluate(step)
            fake.checkpoint(step, loss_at(step) + 0.1, best=step == 40)
    writer = LiveWriter(fake, first_step=41, interval=0.3)
    writer.start()
    try:
        with serve_dashboard(fake.logs_dir, fake.output_dir) as url, chromium_page() as page:
            console_errors = []
            page.on("console", lambda msg: msg.type == "error" and console_errors.append(msg.text))
            page.goto(url + "/")
            page.wait_for_function("() => /^[0-9,]+$/.test(document.getElementById('stat-step').textContent)")
            first = shown_step(page)
            assert 41 <= first <= writer.step
            assert page.text_content("#status").strip() == "running"
            wait_for_plots(page)

            # The page moves on by itself as the run advances (refresh: 1 s).
            page.wait_for_function(f"() => Number(document.body.dataset.step) >= {first + 3}", timeout=15_000)
            later = shown_step(page)
            assert later > first and later <= writer.step
            assert page.is_visible("#val-cards") and page.is_hidden("#val-empty")
            assert page.locator("#ckpt-rows tr").count() >= 4
            assert page.locator("#timeline li").count() >= 8
            assert "No GPU visible" in page.text_content("#gpu-empty") or page.locator(".gpu").count() > 0
            wait_for_plots(page)

            assert_pauses_while_hidden(page)

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert not console_errors, console_errors
    finally:
        writer.stop()


def assert_pauses_while_hidden(page) -> None:
    """Auto-refresh stops while the tab is hidden and resumes when shown."""
    page.evaluate("""() => {
        window.__fetches = 0;
        const original = window.fetch;
        window.fetch = (...args) => { window.__fetches += 1; return original(...args); };
        Object.defineProperty(document, 'hidden', {configurable: true, get: () => window.__hidden === true});
        window.__hidden = true;
        document.dispatchEvent(new Event('visibilitychange'));
    }""")
    page.wait_for_timeout(1500)  # let a refresh already in flight finish
    before = page.evaluate("window.__fetches")
    page.wait_for_timeout(2500)  # the refresh interval is 1 s
    assert page.evaluate("window.__fetches") == before, "refreshed while hidden"
    page.evaluate("() => { window.__hidden = false; document.dispatchEvent(new Event('visibilitychange')); }")
    page.wait_for_function(f"() => window.__fetches > {before}", timeout=5000)


def test_token_protected_page_in_browser(tmp_path):
    fake = FakeRun(tmp_path / "run", total_steps=50)
    fake.start()
    fake.steps(1, 12, eval_every=5)
    with serve_dashboard(fake.logs_dir, token="tok-123") as url, chromium_page() as page:
        response = page.goto(url + "/")
        assert response.status == 401
        page.goto(url + "/?token=tok-123")
        assert page.url == url + "/"  # the token does not stay in the address bar
        page.wait_for_function("() => document.getElementById('stat-step').textContent === '12'")
        wait_for_plots(page)
