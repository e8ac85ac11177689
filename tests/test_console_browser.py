"""The web console in a real browser: Playwright driving Debian's Chromium (headless), against a
real `glmkit serve` on loopback.  Screenshots go to test-artifacts/ (conftest.screenshot)."""

import shutil

import pytest

from conftest import screenshot as shot
from server_helpers import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    data = tmp_path_factory.mktemp("console")
    with running_server("--data-dir", str(data), "--no-embeddings", "--threads", "2") as (url, _):
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            pg = browser.new_page(viewport={"width": 1280, "height": 760}, bypass_csp=True)  # for wait_for_function
            pg.goto(url)
            yield pg
            browser.close()


def test_send_and_see_a_streamed_reply(page):
    page.fill("#temperature", "0")          # greedy: the default model's answer names Paris
    page.fill("#input", "What is the capital of France?")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length >= 1 && "
                           "document.querySelector('.msg.assistant').textContent.includes('Paris')", timeout=60_000)
    page.wait_for_selector("#stop[disabled]", state="attached", timeout=60_000)
    assert page.locator("#conversations li").count() == 1
    shot(page, "streamed")


def test_stop_a_long_reply_and_reload_keeps_everything(page):
    page.fill("#max_new_tokens", "2048")
    page.fill("#input", "Write a very long story about a dragon who learns to cook.")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length >= 2 && "
                           "document.querySelectorAll('.msg.assistant')[1].textContent.length > 40", timeout=60_000)
    page.click("#stop")
    page.wait_for_function("document.body.dataset.busy === ''", timeout=30_000)
    stopped = page.locator(".msg.assistant").nth(1)       # as stored: the page reloads it after Stop
    assert 0 < len(stopped.text_content()) < 4000 and stopped.locator(".badge", has_text="stopped").count() == 1
    shown = stopped.text_content()
    page.reload()
    page.wait_for_selector(".msg.assistant >> nth=1", timeout=30_000)
    assert page.locator(".msg.user").count() == 2
    assert page.locator(".msg.assistant").nth(1).text_content() == shown
    shot(page, "reloaded")


def test_rename_and_delete(page):
    page.once("dialog", lambda d: d.accept("Dragons"))
    page.click("#conversations li >> nth=0 >> button.rename")
    page.wait_for_function("document.querySelector('#conversations li .title').textContent === 'Dragons'")
    page.click("#new-chat")
    page.wait_for_function("document.querySelectorAll('#conversations li').length === 2")
    asked = []
    page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))   # asked first: No keeps it
    page.click("#conversations li >> nth=0 >> button.delete")
    page.wait_for_timeout(300)
    assert asked and "Delete" in asked[0] and page.locator("#conversations li").count() == 2
    page.once("dialog", lambda d: d.accept())
    page.click("#conversations li >> nth=0 >> button.delete")
    page.wait_for_function("document.querySelectorAll('#conversations li').length === 1")
    assert page.locator("#conversations li .title").text_content() == "Dragons"
    shot(page, "sidebar")
