"""The console's modes, rendering and login in a real browser: Playwright driving Debian's
Chromium (headless) against a real `glmkit serve` on the embedded default model.  The first reply
to each scripted message is forced token by token (--scripted-replies, a testing aid); running
the tool or the code in the sandbox, and everything the page shows, is the real path.

Screenshots go to test-artifacts/; with GLMKIT_UPDATE_SCREENSHOTS=1 the README's copies in docs/
are rewritten too."""

import json
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import screenshot as shot
from server_helpers import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]

SCRIPTS = {
    "Show me some maths": "Euler's identity is $e^{i\\pi} + 1 = 0$, and\n$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$\n"
                          "In **Python**:\n```python\nimport math\nprint(math.e ** (1j * math.pi) + 1)\n```",
    "Try to inject": "<img src=x onerror=\"window.pwned = 1\"><script>window.pwned = 2</script>"
                          "<div style=\"background:url(http://198.51.100.7/leak)\">styled</div>"
                          "<video poster=\"http://198.51.100.7/poster\"></video> @@MATH9@@ MATHx9x",
    "Plot the sales file": "Reading the file and plotting it.\n```python\nimport matplotlib.pyplot as plt\n"
                           "rows = [l.split(',') for l in open('/mnt/data/sales.csv').read().split()]\n"
                           "total = sum(int(n) for _, n in rows)\nprint('total sales:', total)\n"
                           "plt.bar([m for m, _ in rows], [int(n) for _, n in rows])\nplt.title('Sales')\n"
                           "n = open('/mnt/data/summary.txt', 'w').write(f'total {total}')\n```",
    "Divide by zero": "```python\nprint('before')\n1 / 0\n```",
    "What is 6 times 7?": '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>',
}


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    data = tmp_path_factory.mktemp("console-modes")
    (data / "scripts.json").write_text(json.dumps(SCRIPTS))
    with running_server("--data-dir", str(data / "store"), "--no-embeddings", "--tools", "builtin", "--code",
                        "--max-steps", "1", "--scripted-replies", str(data / "scripts.json")) as (base, _):
        yield base


@pytest.fixture(scope="module")
def page(browser, url):
    # Playwright's wait_for_function evaluates strings, which the console's Content-Security-Policy
    # forbids; the policy itself is checked without this bypass in test_content_security_policy
    pg = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True, bypass_csp=True)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    requests = []
    pg.on("request", lambda r: requests.append(r.url))
    pg.goto(url)
    pg.wait_for_selector("#mode-code")
    pg.fill("#max_new_tokens", "160")
    pg.fill("#temperature", "0")
    yield pg
    assert not errors, errors
    # nothing a reply contained made the browser fetch anything from anywhere else
    assert all(u.startswith((url + "/", "data:", "blob:")) for u in requests), requests


def ask(pg, text):
    pg.fill("#input", text)
    pg.press("#input", "Enter")
    pg.wait_for_function("document.body.dataset.busy === '1'", timeout=10_000)
    pg.wait_for_function("document.body.dataset.busy === ''", timeout=120_000)


def test_markdown_math_code_highlighting_and_no_injected_html(page):
    ask(page, "Show me some maths")
    answer = page.locator(".msg.assistant").first
    assert answer.locator("math").count() == 2                       # KaTeX, inline and display
    assert answer.locator("math[display=block]").count() == 1
    assert answer.locator("strong").text_content() == "Python"
    assert answer.locator("pre code.hljs .hljs-keyword").count() >= 1  # highlighted
    assert answer.locator("pre button.copy").count() == 1
    assert "$$" not in answer.text_content()
    shot(page, "chat")
    ask(page, "Try to inject")
    answer = page.locator(".msg.assistant").nth(1)
    # the model's HTML is inert: no handler ran, no script element made it into the page
    assert page.evaluate("window.pwned") is None
    assert answer.locator("script").count() == 0 and answer.locator("img[onerror]").count() == 0
    assert answer.locator("img").count() == 0         # nor does it make the browser fetch anything
    assert answer.locator("[style], video").count() == 0
    assert "@@MATH9@@ MATHx9x" in answer.text_content()  # text that looks like a placeholder is just text


def test_content_security_policy(browser, url):
    """Defence in depth behind the sanitizer: even markup that got through could not fetch."""
    pg = browser.new_page()
    pg.goto(url)
    pg.wait_for_selector("#mode-chat")          # the page itself runs under the policy
    blocked = pg.evaluate("""() => new Promise((done) => {
        document.addEventListener("securitypolicyviolation", (e) => {
            if (e.blockedURI.includes("198.51.100.7")) done(e.effectiveDirective);
        });
        const i = document.createElement("img");
        i.src = "http://198.51.100.7/leak.png";
        document.body.appendChild(i);
        setTimeout(() => done(null), 5000);
    })""")
    assert blocked == "img-src"
    pg.close()


def test_code_interpreter_upload_run_print_plot_download(page, tmp_path):
    page.click("#mode-code")
    page.wait_for_function("document.body.dataset.mode === 'code'")
    sales = tmp_path / "sales.csv"
    sales.write_text("Jan,3\nFeb,5\nMar,8\n")
    page.set_input_files("#upload", str(sales))
    page.wait_for_selector("#files >> text=sales.csv")
    ask(page, "Plot the sales file")
    cell = page.locator(".code-cell, .msg.assistant pre code.language-python").first
    assert "plt.bar" in cell.text_content()
    output = page.locator(".cell-output").first
    assert "total sales: 16" in output.text_content()
    plot = output.locator("img.plot")
    assert plot.count() == 1 and page.evaluate("(img) => img.naturalWidth", plot.element_handle()) > 100
    # the file the code wrote is listed and downloads with its content
    page.wait_for_selector("#files >> text=summary.txt")
    with page.expect_download() as dl:
        page.click("#files >> text=summary.txt")
    assert Path(dl.value.path()).read_text() == "total 16"
    # a traceback is shown as an error cell
    ask(page, "Divide by zero")
    err = page.locator(".cell-output.error").last
    assert "ZeroDivisionError" in err.text_content() and "before" in err.text_content()
    page.evaluate("document.getElementById('messages').scrollTop = 0")
    shot(page, "code")
    # a reload keeps the whole run: code, output, plot
    page.reload()
    page.wait_for_selector(".cell-output img.plot", timeout=30_000)
    assert page.evaluate("document.body.dataset.mode") == "code"


def test_tool_mode_shows_each_step(page):
    page.click("#mode-tool")
    page.wait_for_function("document.body.dataset.mode === 'tool'")
    ask(page, "What is 6 times 7?")
    call = page.locator(".step", has_text="Tool call · calculator").first
    result = page.locator(".step.result").first
    assert "✓ Result · calculator" in result.locator("summary").text_content()
    assert not result.evaluate("(d) => d.open")                       # collapsed until clicked
    result.locator("summary").click()
    assert '"result": 42' in result.locator("pre").text_content()
    call.locator("summary").click()
    assert '"6*7"' in call.locator("pre").text_content()
    shot(page, "tool")


def test_settings_are_kept_per_conversation_and_clear(page, url):
    page.click("#mode-chat")
    page.wait_for_function("document.body.dataset.mode === 'chat'")
    page.fill("#system", "You are terse.")
    page.dispatch_event("#system", "change")
    page.fill("#top_k", "7")
    page.dispatch_event("#top_k", "change")
    ask(page, "Hello")
    page.reload()
    page.wait_for_selector("#conversations li.active")
    assert page.input_value("#top_k") == "7" and page.input_value("#system") == "You are terse."
    # only what was changed (here and by the fixture) is kept: the sliders left alone (top_p,
    # repetition_penalty) follow the defaults of whichever model answers
    cid = page.evaluate("current.id")
    assert httpx.get(f"{url}/api/conversations/{cid}").json()["settings"] == \
        {"system": "You are terse.", "top_k": 7, "temperature": 0, "max_new_tokens": 160}
    # another conversation has its own settings
    page.click("#conversations li >> nth=1")
    page.wait_for_function("document.querySelector('#top_k-v').textContent !== '7'")
    # Clear empties the conversation but keeps it
    page.click("#conversations li >> nth=0")
    page.wait_for_selector(".msg.user")
    page.once("dialog", lambda d: d.accept())      # Clear asks first
    page.click("#clear")
    page.wait_for_function("document.querySelectorAll('#messages > *').length === 0")
    page.reload()
    page.wait_for_selector("#conversations li.active")
    assert page.locator("#messages > *").count() == 0 and page.input_value("#top_k") == "7"


def test_login_and_each_key_sees_its_own_conversations(browser, tmp_path):
    with running_server("--data-dir", str(tmp_path), "--no-embeddings", "--api-key", "alice-key",
                        "--api-key", "bob-key") as (base, _):
        pg = browser.new_page(bypass_csp=True)
        pg.goto(base)
        pg.wait_for_selector("#login[open]")                          # no key yet: asked for one
        shot(pg, "login")
        pg.fill("#api-key", "alice-key")
        pg.click("#login-ok")
        pg.wait_for_selector("#mode-chat")
        pg.fill("#max_new_tokens", "16")
        ask(pg, "Alice's question")
        assert pg.locator("#conversations li").count() == 1
        # bob, on the same browser, sees none of it
        pg.evaluate("localStorage.setItem('glmkit-key', 'bob-key')")
        pg.reload()
        pg.wait_for_selector("#mode-chat")
        pg.wait_for_timeout(500)
        assert pg.locator("#conversations li").count() == 0
        # a saved key that is refused is asked again, saying so, and nothing of the app is there
        pg.evaluate("localStorage.setItem('glmkit-key', 'mallory')")
        pg.reload()
        pg.wait_for_selector("#login[open]")
        assert "no longer accepted" in pg.text_content("#login-error") and pg.locator("#messages").count() == 0
        pg.fill("#api-key", "alice-key")
        pg.click("#login-ok")
        pg.wait_for_selector("#conversations li")
        assert pg.locator("#conversations li .title").text_content() == "Alice's question"
        pg.close()
