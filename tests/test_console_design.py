"""The console as a company deploys it, in a real browser: Playwright driving Debian's Chromium
(headless) against one real `glmkit serve` with an API key, Code and Tool modes, on the embedded
default model (a small model, so the small-model note shows).  The first reply to each scripted
message is forced (--scripted-replies, a testing aid); everything else is the real path.

The tests run in order on one page: sign in, then use the app, then sign out.  Screenshots at
phone and desktop width, light and dark, are written to test-artifacts/screenshots/ on every run;
with GLMKIT_UPDATE_SCREENSHOTS=1 to docs/screenshots/ (the README's images are made this way, as
conftest.screenshot makes the others), so a test run leaves the checkout unchanged."""

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import ARTIFACTS
from server_helpers import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
KEY = "design-key"
SHOTS = (Path(__file__).parent.parent / "docs" / "screenshots" if os.environ.get("GLMKIT_UPDATE_SCREENSHOTS")
         else ARTIFACTS / "screenshots")
PLOT = "```python\nimport matplotlib.pyplot as plt\nprint('hello from run')\nplt.plot([1, 4, 2, 8])\nplt.title('Run')\n```"

SCRIPTS = {
    "Where should I travel?": "Try **Zanzibar**: warm water, spice markets and old stone town streets.",
    # an unlabelled block: shown as code (Run would run it), not a call the model makes
    "Tell me everything about rivers": "```\nprint('rivers')\n```\n" + "Rivers carry water to the sea. " * 20,
    PLOT: "Press **▶ Run** to run it.",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("console-design")
    (data / "scripts.json").write_text(json.dumps(SCRIPTS))
    with running_server("--data-dir", str(data / "store"), "--no-embeddings", "--tools", "builtin", "--code",
                        "--max-steps", "1", "--api-key", KEY, "--scripted-replies", str(data / "scripts.json")) as (base, _):
        yield base


@pytest.fixture(scope="module")
def page(server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        # Playwright's wait_for_function evaluates strings, which the console's policy forbids
        pg = browser.new_page(viewport={"width": 1280, "height": 800}, bypass_csp=True)
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(server)
        yield pg
        browser.close()
        assert not errors, errors


def api(server, path):
    return httpx.get(server + path, headers={"Authorization": f"Bearer {KEY}"}).json()


def ask(pg, text):
    pg.fill("#input", text)
    pg.press("#input", "Enter")
    pg.wait_for_function("document.body.dataset.busy === '1'", timeout=10_000)
    pg.wait_for_function("document.body.dataset.busy === ''", timeout=120_000)


def active(pg) -> str:
    return pg.get_attribute("#conversations li.active", "data-id")


def new_chat(pg):
    before = pg.locator("#conversations li").count()
    pg.click("#new-chat")
    pg.wait_for_function(f"document.querySelectorAll('#conversations li').length === {before + 1}")


def test_nothing_of_the_app_before_login_and_a_wrong_key_is_an_error(page):
    page.wait_for_selector("#login[open]")
    app_ids = ["app", "messages", "sidebar", "composer", "settings", "conversations", "new-chat"]
    assert page.evaluate("(ids) => ids.filter((i) => document.getElementById(i))", app_ids) == []
    assert "New conversation" not in page.evaluate("document.body.innerText")
    assert page.is_hidden("#login-error")
    page.fill("#api-key", "mallory")
    page.click("#login-ok")
    page.wait_for_selector("#login-error:not([hidden])")
    assert "not accepted" in page.text_content("#login-error")
    assert page.locator("#login[open]").count() == 1 and page.locator("#app").count() == 0
    page.fill("#api-key", KEY)
    page.click("#login-ok")
    page.wait_for_selector("#mode-chat")
    assert page.locator("#login[open]").count() == 0 and page.is_visible("#sign-out")
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")


def test_small_model_note_appears_once(page):
    assert page.is_hidden("#note")                               # not in Chat mode
    page.click("#mode-tool")
    page.wait_for_function("document.body.dataset.mode === 'tool'")
    note = page.locator("#note")
    assert note.is_visible() and note.count() == 1
    text = note.text_content()
    assert "small model" in text and "no native tool protocol" in text and "glmkit serve -m PATH/TO/chatglm3-6b" in text
    page.click("#mode-code")
    page.wait_for_function("document.body.dataset.mode === 'code'")
    assert page.locator("#note").count() == 1 and note.is_visible()   # the same one note, not another
    page.click("#note-close")
    assert note.is_hidden()
    page.click("#mode-tool")
    page.wait_for_function("document.body.dataset.mode === 'tool'")
    assert note.is_hidden()                                      # once per page load
    page.click("#mode-chat")
    page.wait_for_function("document.body.dataset.mode === 'chat'")


def test_an_attached_text_file_reaches_the_model(page, server, tmp_path):
    new_chat(page)
    big = tmp_path / "big.txt"
    big.write_text("x" * 150_000)
    page.set_input_files("#attach", str(big))
    too_big = page.locator(".toast", has_text="at most 100 kB")
    too_big.wait_for()                                                   # too big: said, and not attached
    assert page.locator("#attachments .chip").count() == 0
    too_big.locator("button").click()                                    # dismissed: the tests share the page
    notes = tmp_path / "notes.txt"
    notes.write_text("The secret word is PAPAYA.\n")
    page.set_input_files("#attach", str(notes))
    page.wait_for_selector("#attachments .chip >> text=notes.txt")
    page.fill("#max_new_tokens", "16")
    ask(page, "What is the secret word in the file?")
    assert page.locator("#attachments .chip").count() == 0 and page.input_value("#input") == ""
    user = api(server, f"/api/conversations/{active(page)}")["messages"][0]
    assert user["role"] == "user" and "`notes.txt`" in user["content"] and "The secret word is PAPAYA." in user["content"]
    assert user["content"].startswith("What is the secret word in the file?\n\nAttached file `notes.txt`:\n```txt\n")
    # user messages are Markdown: the attachment is a code block in the bubble
    assert page.locator(".msg.user pre code", has_text="PAPAYA").count() == 1
    page.fill("#max_new_tokens", "160")


def test_a_refused_request_is_shown_on_the_page(page):
    page.once("dialog", lambda d: d.accept("t" * 300))            # longer than a title may be
    page.click("#conversations li.active button.rename")
    refused = page.locator(".toast", has_text="title")
    refused.wait_for()
    refused.locator("button").click()
    assert page.locator(".toast").count() == 0                          # its own toast, and none left over


def test_search_finds_a_conversation_by_a_word_in_a_reply(page):
    new_chat(page)
    ask(page, "Where should I travel?")
    page.fill("#search", "zanzib")
    page.wait_for_function("document.querySelectorAll('#conversations li').length === 1")
    hit = page.locator("#conversations li")
    assert hit.locator(".title").text_content() == "Where should I travel?" and "Zanzibar" in hit.text_content()
    page.fill("#search", "quetzalcoatl")
    page.wait_for_selector("#conversations li.empty")
    page.fill("#search", "")
    page.wait_for_function("document.querySelectorAll('#conversations li[data-id]').length >= 2")


def test_esc_stops_a_streaming_reply(page):
    page.fill("#max_new_tokens", "1024")
    before = page.locator(".msg.assistant").count()
    page.fill("#input", "Write a very long story about a dragon who learns to cook.")
    page.press("#input", "Enter")
    page.wait_for_function(f"(() => {{ const a = document.querySelectorAll('.msg.assistant'); "
                           f"return a.length > {before} && a[a.length - 1].textContent.length > 40; }})()",
                           timeout=60_000)
    assert page.evaluate("document.body.dataset.busy") == "1"
    page.keyboard.press("Escape")
    page.wait_for_function("document.body.dataset.busy === ''", timeout=30_000)
    stopped = page.locator(".msg.assistant").last
    assert stopped.locator(".badge", has_text="stopped").count() == 1 and len(stopped.text_content()) < 4000
    page.fill("#max_new_tokens", "160")


def test_an_upload_right_after_switching_to_code_lands_in_the_conversation_shown(page, server, tmp_path):
    left = active(page)                                          # a chat with messages: Code makes a new one
    data = tmp_path / "data.csv"
    data.write_text("a,1\nb,2\n")
    page.click("#mode-code")
    page.set_input_files("#upload", str(data))                  # no wait between the two
    page.wait_for_selector("#files >> text=data.csv")
    shown = active(page)
    assert shown != left and api(server, f"/api/conversations/{shown}")["mode"] == "code"
    assert [f["name"] for f in api(server, f"/api/conversations/{shown}/files")] == ["data.csv"]
    assert api(server, f"/api/conversations/{left}")["mode"] == "chat"
    assert page.locator(".toast").count() == 0, page.locator(".toast").all_text_contents()


def test_run_on_a_users_code_block_shows_output_and_a_plot(page, server):
    ask(page, PLOT)
    user = page.locator(".msg.user").last
    assert user.locator("pre code.hljs").count() == 1              # Markdown, highlighted
    # the conversation is named after the first line of words, not the code fence
    assert page.text_content("#conversations li.active .title") == "import matplotlib.pyplot as plt"
    user.locator("button.run").click()
    page.wait_for_selector(".cell-output img.plot", timeout=60_000)
    page.wait_for_function("document.body.dataset.busy === ''")
    output = page.locator(".cell-output").last
    assert "hello from run" in output.text_content()
    assert page.evaluate("(img) => img.naturalWidth", output.locator("img.plot").element_handle()) > 100
    assert page.locator(".code-cell.by-user .label", has_text="run by you").count() == 1
    stored = api(server, f"/api/conversations/{active(page)}")["messages"]
    assert [m["extras"].get("by") for m in stored[-2:]] == ["user", "user"] and stored[-1]["extras"]["images"]


def test_a_reply_shows_usage_and_a_cut_reply_is_marked_and_gets_no_run_button(page):
    page.fill("#max_new_tokens", "16")
    page.dispatch_event("#max_new_tokens", "change")
    ask(page, "Tell me everything about rivers")
    reply = page.locator(".msg.assistant").last
    assert reply.locator(".badge.cut", has_text="reply cut at the token limit").count() == 1
    meta = page.locator(".meta").last.text_content()
    assert "completion tokens" in meta and "16 completion" in meta and "tokens/s" in meta
    # its code block may be cut too: it can be copied, not run (the person's block above has Run)
    assert reply.locator("pre button.copy").count() == 1 and reply.locator("button.run").count() == 0
    assert page.locator(".msg.user button.run").count() == 1
    page.fill("#max_new_tokens", "160")
    page.dispatch_event("#max_new_tokens", "change")


def test_layout_and_screenshots_phone_and_desktop_light_and_dark(page):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1400, "height": 800})          # the header stays one line
    middles = page.evaluate("[...document.querySelectorAll('header > *')].filter((e) => e.offsetParent)"
                            ".map((e) => { const r = e.getBoundingClientRect(); return (r.top + r.bottom) / 2; })")
    header = page.evaluate("(() => { const h = document.querySelector('header'); "
                           "return [h.offsetHeight, h.scrollWidth - h.clientWidth]; })()")
    assert len(middles) >= 4 and max(middles) - min(middles) < 4 and header[0] < 64 and header[1] <= 0, (middles, header)
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert (background == "rgb(255, 255, 255)") == (scheme == "light")
        page.set_viewport_size({"width": 1280, "height": 800})
        plot = "document.querySelector('.cell-output img.plot').scrollIntoView({block: 'center'})"
        page.evaluate(plot)
        page.screenshot(path=str(SHOTS / f"console-desktop-{scheme}.png"))
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(250)                                  # the sidebar's slide
        page.evaluate(plot)
        page.screenshot(path=str(SHOTS / f"console-phone-{scheme}.png"))
    page.set_viewport_size({"width": 420, "height": 844})
    page.wait_for_timeout(250)
    box = page.locator("#messages").bounding_box()
    assert box["x"] >= 0 and box["width"] >= 380 and page.is_visible("#input")   # the chat column stays
    assert page.locator("#sidebar").bounding_box()["x"] + page.locator("#sidebar").bounding_box()["width"] <= 0
    assert page.is_hidden("#sign-out")                              # the header keeps to one line
    page.click("#toggle-sidebar")                                  # the sidebar behind a button
    page.wait_for_timeout(250)
    assert page.locator("#sidebar").bounding_box()["x"] == 0 and page.is_visible("#sign-out-side")
    right = page.evaluate("Math.max(...[...document.querySelectorAll('header > *')].map((e) => e.getBoundingClientRect().right))")
    assert right <= 420
    page.locator("#conversations li[data-id]").first.click()
    page.wait_for_timeout(250)
    assert page.locator("#sidebar").bounding_box()["x"] < 0            # choosing closes it
    page.emulate_media(color_scheme="light")
    page.set_viewport_size({"width": 1280, "height": 800})


def test_sign_out_forgets_the_key(page):
    page.click("#sign-out")
    page.wait_for_selector("#login[open]")
    assert page.evaluate("localStorage.getItem('glmkit-key')") is None and page.locator("#app").count() == 0
