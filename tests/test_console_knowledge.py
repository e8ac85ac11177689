"""The console's Knowledge mode (issue 18): knowledge bases through the console's API, per key,
answers from their passages with citations stored beside the reply, and in a real browser
(Playwright driving Debian's Chromium): sign in, Knowledge mode, create a knowledge base, upload
a Markdown document, ask, click the citation, see the passage.

One real `glmkit serve` on the tiny ChatGLM3 fixture with three keys, without an embedding
model (--no-embeddings: the console's knowledge bases are indexed by words only).  The reply to
a question answered from passages is forced (--scripted-replies, a testing aid: ChatGLM3's
prompt then ends with the observation's instruction); retrieval, the prompt, the store and
everything the page shows are the real path."""

import json
import shutil

import httpx
import pytest

pytest.importorskip("sqlite_vec")
pytest.importorskip("jieba")

from conftest import TINY_32K, screenshot  # noqa: E402
from server_helpers import running_server  # noqa: E402

from glmkit.chat.knowledge_context import CITE_INSTRUCTION  # noqa: E402

QUESTION = "How many vacation days do new staff get?"
REPLY = "New staff get the days in [1]. Not [7]."
HANDBOOK_A = """# Staff handbook

## Vacation

New staff get 25 vacation days per year, requested two weeks ahead in the <b>HR portal</b> & nowhere else.

## Parking

Car parking spaces are assigned by lottery every January.
"""
HANDBOOK_B = "# Team B rules\n\n## Vacation\n\nTeam B members get 31 vacation days and must book them with the team lead.\n"
SECRET_A = "# Salaries\n\nThe vacation bonus of the executive team is 9000 euros, paid in June.\n"
ALICE, BOB, CAROL = "sk-alice", "sk-bob", "sk-carol"

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    data = tmp_path_factory.mktemp("console-knowledge")
    (data / "scripts.json").write_text(json.dumps({CITE_INSTRUCTION: REPLY}))
    with running_server("--model", str(TINY_32K), "--threads", "1", "--data-dir", str(data / "store"),
                        "--no-embeddings", "--api-key", ALICE, "--api-key", BOB, "--api-key", CAROL,
                        "--scripted-replies", str(data / "scripts.json")) as (url, _):
        yield url


def H(key):
    return {"Authorization": f"Bearer {key}"}


def put(base, key, kb, name, text):
    return httpx.put(f"{base}/api/knowledge/{kb}/files/{name}", content=text.encode() if isinstance(text, str) else text,
                     headers=H(key), timeout=60)


def sse(r):
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def kbs(base):
    """Alice: "handbook" and "secret"; Bob: a "handbook" of his own."""
    for key, kb, name, text in [(ALICE, "handbook", "handbook.md", HANDBOOK_A), (ALICE, "secret", "salaries.md", SECRET_A),
                                (BOB, "handbook", "team-b.md", HANDBOOK_B)]:
        r = httpx.post(base + "/api/knowledge", json={"name": kb}, headers=H(key))
        assert r.status_code == 200, r.text
        assert r.json()["words_only"] and r.json()["documents"] == 0
        r = put(base, key, kb, name, text)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "added" and r.json()["name"] == name and r.json()["passages"] >= 1
    return base


def test_each_key_has_its_own_knowledge_bases(kbs):
    base = kbs
    assert httpx.get(base + "/api/knowledge").status_code == 401
    mine = httpx.get(base + "/api/knowledge", headers=H(ALICE)).json()
    assert [(k["name"], k["documents"]) for k in mine] == [("handbook", 1), ("secret", 1)]
    assert [k["name"] for k in httpx.get(base + "/api/knowledge", headers=H(BOB)).json()] == ["handbook"]
    docs = httpx.get(base + "/api/knowledge/handbook/documents", headers=H(BOB)).json()
    assert [d["name"] for d in docs] == ["team-b.md"]
    # another key's knowledge base is a 404, whatever is asked of it, the same as no knowledge base at all
    for method, path, body in [("GET", "/api/knowledge/secret/documents", None),
                               ("DELETE", "/api/knowledge/secret", None),
                               ("DELETE", "/api/knowledge/secret/documents/salaries.md", None),
                               ("PUT", "/api/knowledge/secret/files/mine.md", b"# Mine\n\ntext\n")]:
        r = httpx.request(method, base + path, content=body, headers=H(BOB))
        assert r.status_code == 404 and r.json()["error"]["code"] == "knowledge_base_not_found", (method, path)
        assert "9000" not in r.text
    assert httpx.get(base + "/api/knowledge/nope/documents", headers=H(BOB)).status_code == 404
    assert [d["name"] for d in httpx.get(base + "/api/knowledge/secret/documents", headers=H(ALICE)).json()] \
        == ["salaries.md"]
    # the same name for two keys is two knowledge bases; twice for one key is refused
    assert httpx.post(base + "/api/knowledge", json={"name": "handbook"}, headers=H(ALICE)).status_code == 409
    bad = httpx.post(base + "/api/knowledge", json={"name": "../up"}, headers=H(ALICE))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"


def test_bad_documents_are_one_clear_400(kbs):
    base = kbs
    r = put(base, ALICE, "handbook", "tool.exe", b"MZ\x90\x00")
    assert r.status_code == 400 and "unsupported file type" in r.json()["error"]["message"]
    r = put(base, ALICE, "handbook", "report.pdf", b"%PDF-1.4\nnot really a pdf\n")
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and message.startswith("report.pdf: ") and "\n" not in message
    assert "incoming" not in message and "store" not in message      # no path on the server
    assert put(base, ALICE, "handbook", ".hidden.md", "# x\n\ny\n").status_code == 400
    # the same content again is not a second document; the same name with new content replaces it
    assert put(base, ALICE, "handbook", "copy.md", HANDBOOK_A).json()["status"] == "duplicate"
    assert put(base, ALICE, "handbook", "extra.md", "# Extra\n\nBicycles are parked in the yard.\n").json()["status"] == "added"
    assert put(base, ALICE, "handbook", "extra.md", "# Extra\n\nBicycles go in the cellar.\n").json()["status"] == "replaced"
    docs = httpx.get(base + "/api/knowledge/handbook/documents", headers=H(ALICE)).json()
    assert [d["name"] for d in docs] == ["extra.md", "handbook.md"]
    assert httpx.delete(base + "/api/knowledge/handbook/documents/extra.md", headers=H(ALICE)).status_code == 200
    assert httpx.delete(base + "/api/knowledge/handbook/documents/extra.md", headers=H(ALICE)).status_code == 404
    assert [d["name"] for d in httpx.get(base + "/api/knowledge/handbook/documents", headers=H(ALICE)).json()] \
        == ["handbook.md"]


def ask(base, key, cid, kb, **extra):
    return httpx.post(f"{base}/api/conversations/{cid}/messages", headers=H(key), timeout=120,
                      json={"content": QUESTION, "kb": kb, "settings": {"temperature": 0, "max_new_tokens": 40}, **extra})


def test_knowledge_mode_answers_from_the_keys_own_passages(kbs):
    base = kbs
    cfg = httpx.get(base + "/api/config", headers=H(ALICE)).json()
    assert "knowledge" in cfg["modes"]
    cid = httpx.post(base + "/api/conversations", json={"mode": "knowledge"}, headers=H(ALICE)).json()["id"]
    events = sse(ask(base, ALICE, cid, "handbook"))
    assert events[0]["type"] == "knowledge" and events[0]["kb"] == "handbook" and events[0]["passages"] >= 1
    assert "".join(e["text"] for e in events if e["type"] == "text") == REPLY and events[-1]["type"] == "done"
    conv = httpx.get(f"{base}/api/conversations/{cid}", headers=H(ALICE)).json()
    # stored: the question as typed (the passages were in the prompt only) and the reply with what it cites
    assert [(m["role"], m["content"]) for m in conv["messages"]] == [("user", QUESTION), ("assistant", REPLY)]
    extras = conv["messages"][1]["extras"]
    [cite] = extras["citations"]                         # [7] names no passage: left out
    assert cite["n"] == 1 and cite["document"] == "handbook.md" and "25 vacation days" in cite["text"]
    assert cite["heading"] == "Staff handbook > Vacation" and "Parking" not in cite["text"]
    assert extras["knowledge"]["kb"] == "handbook" and extras["knowledge"]["mode"] == "lexical"
    assert "words only" in extras["knowledge"]["note"] and "usage" in extras
    # regenerating answers from the passages again
    events = sse(ask(base, ALICE, cid, "handbook", content=None, regenerate=True))
    conv = httpx.get(f"{base}/api/conversations/{cid}", headers=H(ALICE)).json()
    assert len(conv["messages"]) == 2 and conv["messages"][1]["extras"]["citations"][0]["document"] == "handbook.md"
    # Bob's "handbook" is his own
    bob = httpx.post(base + "/api/conversations", json={"mode": "knowledge"}, headers=H(BOB)).json()["id"]
    sse(ask(base, BOB, bob, "handbook"))
    stored = httpx.get(f"{base}/api/conversations/{bob}", headers=H(BOB)).json()["messages"]
    assert [c["document"] for c in stored[1]["extras"]["citations"]] == ["team-b.md"]
    assert "25 vacation days" not in json.dumps(stored)


def test_knowledge_mode_never_reaches_another_keys_knowledge_base(kbs):
    base = kbs
    cid = httpx.post(base + "/api/conversations", json={"mode": "knowledge"}, headers=H(BOB)).json()["id"]
    r = ask(base, BOB, cid, "secret")
    assert r.status_code == 404 and r.json()["error"]["code"] == "knowledge_base_not_found" and "9000" not in r.text
    r = ask(base, BOB, cid, None)
    assert r.status_code == 400 and r.json()["error"]["param"] == "kb"
    conv = httpx.get(f"{base}/api/conversations/{cid}", headers=H(BOB)).json()
    assert conv["messages"] == [] and conv["title"] == "New conversation"     # a refusal changes nothing


def test_the_api_reaches_the_same_knowledge_bases_per_key(kbs):
    """A knowledge base made in the console is the key's for /v1/chat/completions' glmkit_knowledge too."""
    base = kbs

    def api(key, kb):
        return httpx.post(base + "/v1/chat/completions", headers=H(key), timeout=120, json={
            "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 40, "glmkit_knowledge": {"kb": kb}})
    r = api(ALICE, "secret")
    assert r.status_code == 200, r.text
    assert [c["document"] for c in r.json()["glmkit_citations"]] == ["salaries.md"]
    assert "words only" in r.json()["glmkit_knowledge"]["note"]
    r = api(BOB, "secret")
    assert r.status_code == 404 and "9000" not in r.text
    r = api(CAROL, "handbook")
    assert r.status_code == 404
    # deleting a knowledge base: gone for its key, and from the API
    assert httpx.delete(base + "/api/knowledge/secret", headers=H(ALICE)).json() == {"deleted": "secret"}
    assert api(ALICE, "secret").status_code == 404
    assert [k["name"] for k in httpx.get(base + "/api/knowledge", headers=H(ALICE)).json()] == ["handbook"]


def test_words_only_knowledge_bases_are_searched_by_words(tmp_path):
    """Made without an embedding model (the console of a --no-embeddings server): retrieval is
    lexical, at the terminal too; dense retrieval says why not."""
    from glmkit.knowledge.index import KnowledgeError, KnowledgeStore
    from glmkit.knowledge.ingest import WordsOnly, add_file
    from glmkit.knowledge.retrieval import search
    (tmp_path / "handbook.md").write_text(HANDBOOK_A, encoding="utf-8")
    store = KnowledgeStore(tmp_path / "data")
    kb = store.create("local", "h", WordsOnly.name, WordsOnly.dim)
    assert add_file(store, kb, tmp_path / "handbook.md", WordsOnly()).status == "added"
    hits = search(store, kb, "when is the parking lottery?", WordsOnly())
    assert hits and "lottery" in hits[0].text and hits[0].dense_rank is None
    with pytest.raises(KnowledgeError, match="words only"):
        search(store, kb, "parking", WordsOnly(), mode="dense")
    store.close()


# -- the page ------------------------------------------------------------------------------------
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_browser_upload_ask_and_open_the_cited_passage(base, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    doc = tmp_path / "handbook.md"
    doc.write_text(HANDBOOK_A, encoding="utf-8")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        # Playwright's wait_for_function evaluates strings, which the console's policy forbids
        pg = browser.new_page(viewport={"width": 1280, "height": 800}, bypass_csp=True)
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(base)
        pg.wait_for_selector("#login[open]")
        pg.fill("#api-key", CAROL)
        pg.click("#login-ok")
        pg.wait_for_selector("#mode-knowledge")
        pg.fill("#max_new_tokens", "48")
        pg.fill("#temperature", "0")
        pg.click("#mode-knowledge")
        pg.wait_for_function("document.body.dataset.mode === 'knowledge'")
        pg.wait_for_selector("#kb-pick option", state="attached")          # Carol has none yet
        pg.fill("#kb-name", "policies")
        pg.click("#kb-create")
        pg.wait_for_function("document.getElementById('kb-pick').value === 'policies'")
        pg.set_input_files("#kb-upload", str(doc))
        pg.wait_for_selector("#kb-docs >> text=handbook.md", timeout=60_000)
        pg.fill("#input", QUESTION)
        pg.press("#input", "Enter")
        pg.wait_for_selector(".msg.assistant a.cite", timeout=120_000)
        pg.wait_for_function("document.body.dataset.busy === ''", timeout=60_000)
        answer = pg.locator(".msg.assistant").last
        assert answer.text_content().startswith("New staff get the days in [1]. Not [7].")
        assert answer.locator("a.cite").count() == 1                       # [7] cites nothing: plain text
        pg.locator(".msg.assistant a.cite").click()
        pg.wait_for_selector("#passage[open]")
        shown = pg.text_content("#passage-text")
        # the document's own text, as text: its markup is not markup here
        assert "New staff get 25 vacation days per year" in shown and "<b>HR portal</b> & nowhere else" in shown
        assert pg.locator("#passage-text *").count() == 0 and "Parking" not in shown
        assert "handbook.md" in pg.text_content("#passage-doc") and "Vacation" in pg.text_content("#passage-pos")
        screenshot(pg, "knowledge")
        pg.click("#passage-close")
        pg.wait_for_selector("#passage[open]", state="detached")
        # a reload keeps the citations (stored with the reply) and the knowledge base picked
        pg.reload()
        pg.wait_for_selector(".msg.assistant a.cite", timeout=30_000)
        assert pg.evaluate("document.body.dataset.mode") == "knowledge"
        pg.wait_for_function("document.getElementById('kb-pick').value === 'policies'")
        pg.locator(".sources button.source").first.click()
        pg.wait_for_selector("#passage[open]")
        assert pg.text_content("#passage-text") == shown
        pg.click("#passage-close")
        # the fourth mode keeps the header on one line, down to a phone's width
        pg.set_viewport_size({"width": 420, "height": 844})
        pg.wait_for_timeout(250)
        right = pg.evaluate("Math.max(...[...document.querySelectorAll('header > *')]"
                            ".map((e) => e.getBoundingClientRect().right))")
        assert right <= 420 and pg.is_visible("#mode-knowledge")
        browser.close()
        assert not errors, errors
    # Carol's knowledge base is hers: nobody else sees it
    assert [k["name"] for k in httpx.get(base + "/api/knowledge", headers=H(CAROL)).json()] == ["policies"]
    assert httpx.get(base + "/api/knowledge/policies/documents", headers=H(ALICE)).status_code == 404
