"""The dashboard in a real browser: headless Debian chromium driven by Playwright,
against the real CLI server on 127.0.0.1 while a live run appends logs.

The `serve_dashboard` and `chromium` fixtures (tests/conftest.py) are reusable,
e.g. with the real tiny trainer writing the logs (test_dashboard_real_run.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from conftest import wait_for_plots
from fakes import FakeRun, LiveWriter, loss_at, tokens_seen_at

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def shown_step(page) -> int | None:
    text = page.text_content("#stat-step").replace(",", "").strip()
    return int(text) if text.isdigit() else None


def test_live_run_in_browser(tmp_path, serve_dashboard, chromium):
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
        url = serve_dashboard(fake.logs_dir, fake.output_dir).url
        page = chromium()
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
        assert "No GPU on this machine" in page.text_content("#gpu-empty") or page.locator(".gpu").count() > 0
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


def test_token_protected_page_in_browser(tmp_path, serve_dashboard, chromium):
    fake = FakeRun(tmp_path / "run", total_steps=50)
    fake.start()
    fake.steps(1, 12, eval_every=5)
    url = serve_dashboard(fake.logs_dir, token="tok-123").url
    page = chromium()
    response = page.goto(url + "/")
    assert response.status == 401
    page.goto(url + "/?token=tok-123")
    assert page.url == url + "/"  # the token does not stay in the address bar
    page.wait_for_function("() => document.getElementById('stat-step').textContent === '12'")
    # The card shows the run's cumulative tokens_seen, not the last step's `tokens` (64,372: "64.4k").
    assert tokens_seen_at(12) == 778_866
    assert page.text_content("#stat-tokens").strip() == "779k tokens seen"
    assert "across resumes" in page.get_attribute("#stat-tokens", "title")
    wait_for_plots(page)


def test_tokens_card_of_a_log_without_tokens_seen(tmp_path, serve_dashboard, chromium):
    """An old log (no tokens_seen): the card sums each step's tokens and its tooltip says it is estimated."""
    fake = FakeRun(tmp_path / "run", total_steps=50, with_tokens_seen=False)
    fake.start()
    fake.steps(1, 12)
    page = chromium()
    page.goto(serve_dashboard(fake.logs_dir).url + "/")
    page.wait_for_function("() => document.getElementById('stat-step').textContent === '12'")
    assert page.text_content("#stat-tokens").strip() == "779k tokens seen"  # log_interval 1: the exact sum
    assert page.get_attribute("#stat-tokens", "title").startswith("estimated")


def test_an_unreadable_log_is_named_in_the_footer(tmp_path, serve_dashboard, chromium):
    fake = FakeRun(tmp_path / "run", total_steps=50)
    fake.start()
    fake.steps(1, 8)
    Path(fake.path("eval")).mkdir()  # where eval_log.jsonl should be
    page = chromium()
    page.goto(serve_dashboard(fake.logs_dir).url + "/")
    page.wait_for_function("() => document.getElementById('stat-step').textContent === '8'")
    assert page.text_content("#bad-lines").strip() == "eval_log.jsonl is a directory, not a log file"
    assert page.get_attribute("#bad-lines", "class") == "warn"
