"""Knowledge bases (glmkit.knowledge, `glmkit kb`): a small mixed corpus written here (a PDF made
with fpdf2, a DOCX with python-docx, Markdown, HTML, Chinese and English text), its positions, a
changed file replacing its passages, bad files reported and skipped, retrieval quality on a
question set written with the corpus (hybrid vs lexical-only vs dense-only, printed), complete
deletion, and one owner never seeing another's documents."""

import os
import struct

import pytest

pytest.importorskip("sqlite_vec")
pytest.importorskip("jieba")
pytest.importorskip("pypdf")
pytest.importorskip("docx")
fpdf = pytest.importorskip("fpdf")

from glmkit.knowledge.chunking import Chunk  # noqa: E402
from glmkit.knowledge.index import KnowledgeStore, NotFound  # noqa: E402
from glmkit.knowledge.schema import MIGRATIONS  # noqa: E402
from glmkit.knowledge.ingest import add_files, load_embedder  # noqa: E402
from glmkit.knowledge.parsers import BadDocument, parse  # noqa: E402
from glmkit.knowledge.retrieval import search  # noqa: E402

# -- the corpus ------------------------------------------------------------------------------
PDF_PAGES = [  # English travel policy, one topic per page
    ("Travel booking", [
        "All business trips must be booked through the Orbit travel portal at least ten days before departure.",
        "Economy class is required for flights shorter than six hours; premium economy is allowed for longer flights.",
    ]),
    ("Daily allowance", [
        "The per diem for meals while travelling is 65 euros per day within Europe and 80 dollars per day in North America.",
        "Hotel rooms are reimbursed up to 180 euros per night; a more expensive room needs approval from a director.",
    ]),
    ("After the trip", [
        "Expense reports for a trip must be filed within thirty days of returning, with scanned receipts attached.",
        "Unused train tickets must be refunded through the portal; the refund goes back to the company card.",
    ]),
]

MARKDOWN = """# 休假制度

## 年假

员工每年享有十五天带薪年假，入职满五年后增加到二十天。

年假需要至少提前两周在人事系统中提交申请，并由直属经理批准。

## 病假

病假超过三天需要提供医院开具的诊断证明。

每年有十天全薪病假，超出部分按基本工资的百分之六十发放。

## Parental leave

New parents receive sixteen weeks of fully paid parental leave, to be taken within the first year.
"""

HTML = """<!doctype html><html><head><title>Office guide</title><style>p{color:red}</style>
<script>var tracking = "ignore me";</script></head><body>
<nav>Home | About</nav>
<h1>Office guide</h1>
<h2>Building access</h2>
<p>Badges are issued by the front desk on the ground floor on your first day; a lost badge costs 25 euros to replace.</p>
<p>The building is open from 7 am to 10 pm on weekdays and closed on public holidays.</p>
<h2>Parking</h2>
<p>Bicycle parking is in the basement; car parking spaces are assigned by lottery every January.</p>
<h2>Kitchen</h2>
<p>Free coffee and fruit are provided on every floor; the kitchen dishwasher runs at 6 pm.</p>
</body></html>"""

TEXT_ZH = """信息安全规定

工作电脑的登录密码至少十二位，并且每九十天必须更换一次。

离开座位时必须锁定屏幕，公司文件禁止上传到个人网盘。

发现可疑的钓鱼邮件时，请立即转发给安全团队 security@example.com 并删除原邮件。
"""

DOCX_SECTIONS = [  # (heading, paragraphs), Chinese and English
    ("报销流程", [
        "差旅报销单需要在出差结束后三十天内提交，并附上所有发票原件。",
        "单笔超过五千元的报销需要财务总监签字批准。",
    ]),
    ("培训", [
        "每位员工每年有八千元的培训预算，可以用于课程、书籍和技术会议。",
        "参加外部培训前需要填写培训申请表，说明培训对工作的帮助。",
    ]),
    ("Remote work", [
        "Employees may work from home up to three days per week after their probation period ends.",
        "The company pays a one-time home office allowance of 300 euros for a desk and chair.",
    ]),
]

# (question, document, a piece of its gold passage)
QUESTIONS = [
    ("How far in advance must business trips be booked?", "travel.pdf", "at least ten days"),
    ("Which class may I fly on a long flight?", "travel.pdf", "premium economy"),
    ("What is the daily meal allowance in Europe?", "travel.pdf", "65 euros per day"),
    ("How much can a hotel room cost per night?", "travel.pdf", "180 euros per night"),
    ("What is the deadline for filing an expense report after a trip?", "travel.pdf", "within thirty days"),
    ("What happens to unused train tickets?", "travel.pdf", "Unused train tickets"),
    ("How long is parental leave?", "leave.md", "sixteen weeks"),
    ("How much does it cost to replace a lost badge?", "office.html", "lost badge"),
    ("What are the building opening hours?", "office.html", "7 am to 10 pm"),
    ("How are car parking spaces assigned?", "office.html", "lottery"),
    ("Is coffee free in the office?", "office.html", "Free coffee"),
    ("Where can I park my bicycle?", "office.html", "Bicycle parking"),
    ("How many days a week can I work from home?", "policies.docx", "three days per week"),
    ("Is there an allowance for a home office desk?", "policies.docx", "home office allowance"),
    ("When does the dishwasher run?", "office.html", "dishwasher"),
    ("Who issues badges to new employees?", "office.html", "front desk"),
    ("员工每年有多少天年假？", "leave.md", "十五天带薪年假"),
    ("年假要提前多久申请？", "leave.md", "提前两周"),
    ("病假超过三天需要什么证明？", "leave.md", "诊断证明"),
    ("每年有几天全薪病假？", "leave.md", "十天全薪病假"),
    ("工作满五年后年假有多少天？", "leave.md", "二十天"),
    ("电脑密码至少多少位？", "security.txt", "十二位"),
    ("密码多久需要更换一次？", "security.txt", "九十天"),
    ("离开座位时应该做什么？", "security.txt", "锁定屏幕"),
    ("收到钓鱼邮件怎么办？", "security.txt", "钓鱼邮件"),
    ("公司文件可以上传到个人网盘吗？", "security.txt", "个人网盘"),
    ("差旅报销单的提交期限是多久？", "policies.docx", "三十天内提交"),
    ("超过五千元的报销需要谁批准？", "policies.docx", "财务总监"),
    ("每年的培训预算是多少？", "policies.docx", "八千元"),
    ("参加外部培训前需要做什么？", "policies.docx", "培训申请表"),
    ("Who must approve an expensive hotel room?", "travel.pdf", "approval from a director"),
    ("Are scanned receipts needed for expense reports?", "travel.pdf", "scanned receipts"),
]


def write_pdf(path, pages=PDF_PAGES):
    pdf = fpdf.FPDF()
    pdf.set_font("helvetica", size=12)
    for title, paras in pages:
        pdf.add_page()
        pdf.set_font("helvetica", style="B", size=14)
        pdf.multi_cell(0, 8, title)
        pdf.ln(6)
        pdf.set_font("helvetica", size=12)
        for p in paras:
            pdf.multi_cell(0, 7, p)
            pdf.ln(6)
    pdf.output(str(path))


def write_docx(path, sections=DOCX_SECTIONS):
    import docx
    d = docx.Document()
    d.add_heading("公司制度 Company policies", level=0)
    for heading, paras in sections:
        d.add_heading(heading, level=1)
        for p in paras:
            d.add_paragraph(p)
    d.save(str(path))


def write_corpus(folder):
    folder.mkdir(parents=True, exist_ok=True)
    write_pdf(folder / "travel.pdf")
    write_docx(folder / "policies.docx")
    (folder / "leave.md").write_text(MARKDOWN, encoding="utf-8")
    (folder / "office.html").write_text(HTML, encoding="utf-8")
    (folder / "security.txt").write_text(TEXT_ZH, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def embedder():
    try:
        return load_embedder(None)
    except Exception as e:            # noqa: BLE001
        pytest.skip(f"no embedding model: {e}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, embedder):
    base = tmp_path_factory.mktemp("kb")
    docs = write_corpus(base / "docs")
    store = KnowledgeStore(base / "data")
    kb = store.create("local", "handbook", embedder.name, embedder.dim)
    report = add_files(store, kb, [str(docs)], embedder)
    assert not report.failed, report.failed
    return store, kb, docs


def test_positions_are_kept(corpus):
    store, kb, _ = corpus
    by_text = {c["text"]: c for c in store.chunks(kb)}

    def find(piece):
        found = [c for t, c in by_text.items() if piece in t]
        assert found, f"{piece!r} is in no passage"
        return found[0]

    assert find("per diem")["page"] == 2 and find("per diem")["document"] == "travel.pdf"
    assert find("Unused train tickets")["page"] == 3
    assert find("ten days before departure")["page"] == 1
    md = find("诊断证明")
    assert md["heading"] == "休假制度 > 病假" and md["line"] == MARKDOWN.splitlines().index(
        "病假超过三天需要提供医院开具的诊断证明。") + 1
    assert find("sixteen weeks")["heading"] == "休假制度 > Parental leave"
    assert find("lottery")["heading"] == "Office guide > Parking"
    assert not any("tracking" in t or "Home | About" in t for t in by_text)      # script and nav dropped
    docx_chunk = find("八千元")
    assert docx_chunk["heading"] == "公司制度 Company policies > 培训" and docx_chunk["paragraph"] is not None
    assert find("锁定屏幕")["line"] == 1           # a short text packs into one passage: it starts at line 1
    assert find("全薪病假")["line"] == find("诊断证明")["line"]       # one passage, cited where it starts
    docs = {d["name"]: d for d in store.documents(kb)}
    assert set(docs) == {"travel.pdf", "policies.docx", "leave.md", "office.html", "security.txt"}
    assert docs["travel.pdf"]["pages"] == 3
    # stored raw: the text a passage holds is the document's, byte for byte
    assert find("十五天带薪年假")["text"] == ("员工每年享有十五天带薪年假，入职满五年后增加到二十天。\n\n"
                                        "年假需要至少提前两周在人事系统中提交申请，并由直属经理批准。")


def test_retrieval_quality_hybrid_beats_each_index_alone(corpus, embedder):
    store, kb, _ = corpus
    assert len(QUESTIONS) >= 30
    vectors = embedder.embed([q for q, _, _ in QUESTIONS])[0]
    recall, first, misses = {}, {}, {}
    for mode in ("lexical", "dense", "hybrid"):
        found = top = 0
        for (q, doc, gold), v in zip(QUESTIONS, vectors):
            hits = search(store, kb, q, top_k=5, mode=mode, query_vector=v)
            right = [h.document == doc and gold in h.text for h in hits]
            found += any(right)
            top += bool(right and right[0])
            if not any(right):
                misses.setdefault(mode, []).append(q)
        recall[mode], first[mode] = found / len(QUESTIONS), top / len(QUESTIONS)
    print(f"\nrecall@5 on {len(QUESTIONS)} questions: " + ", ".join(f"{m} {r:.3f}" for m, r in recall.items())
          + "; recall@1: " + ", ".join(f"{m} {r:.3f}" for m, r in first.items()))
    for m, qs in misses.items():
        print(f"  {m} missed: {qs}")
    assert recall["hybrid"] >= 0.9
    assert recall["hybrid"] >= recall["lexical"] and recall["hybrid"] >= recall["dense"]


def test_search_reports_document_position_and_score(corpus, embedder):
    store, kb, _ = corpus
    hits = search(store, kb, "每年有几天全薪病假？", embedder, top_k=3)
    assert hits[0].document == "leave.md" and "十天全薪病假" in hits[0].text
    assert hits[0].position.startswith("§ 休假制度 > 病假, line ")
    assert 0 < hits[-1].score <= hits[0].score <= 1.0
    assert search(store, kb, "每年有几天全薪病假？", embedder, top_k=3, min_score=0.99)[0].score >= 0.99


def test_readding_a_changed_file_replaces_its_passages(tmp_path, embedder):
    docs = tmp_path / "docs"
    docs.mkdir()
    md = docs / "leave.md"
    md.write_text(MARKDOWN, encoding="utf-8")
    store = KnowledgeStore(tmp_path / "data")
    kb = store.create("local", "h", embedder.name, embedder.dim)
    assert add_files(store, kb, [str(md)], embedder).outcomes[0].status == "added"
    before = store.chunks(kb)
    assert add_files(store, kb, [str(md)], embedder).outcomes[0].status == "unchanged"
    md.write_text(MARKDOWN.replace("十五天带薪年假", "十八天带薪年假"), encoding="utf-8")
    outcome = add_files(store, kb, [str(md)], embedder).outcomes[0]
    assert outcome.status == "replaced" and outcome.name == "leave.md"
    after = store.chunks(kb)
    assert len(store.documents(kb)) == 1
    assert len(after) == len(before)
    texts = " ".join(c["text"] for c in after)
    assert "十八天带薪年假" in texts and "十五天带薪年假" not in texts
    assert not {c["id"] for c in before} & {c["id"] for c in after}
    assert store.counts(kb) == {"documents": 1, "chunks": len(after), "fts": len(after), "vectors": len(after)}
    hits = search(store, kb, "年假有多少天", embedder, top_k=1, mode="lexical")
    assert "十八天" in hits[0].text
    # the same content under another name is not indexed twice
    (docs / "copy.md").write_bytes(md.read_bytes())
    assert add_files(store, kb, [str(docs / "copy.md")], embedder).outcomes[0].status == "duplicate"


def test_bad_files_are_reported_one_line_each_and_skipped(tmp_path, embedder):
    docs = tmp_path / "docs"
    docs.mkdir()
    pdf = fpdf.FPDF()
    pdf.set_encryption(owner_password="owner", user_password="secret")
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.cell(0, 10, "locked text")
    pdf.output(str(docs / "locked.pdf"))
    write_docx(docs / "broken.docx")
    data = (docs / "broken.docx").read_bytes()
    (docs / "broken.docx").write_bytes(data[: len(data) // 2])         # a truncated download
    (docs / "garbage.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf\n" + os.urandom(200))
    (docs / "empty.md").write_text("", encoding="utf-8")
    (docs / "blank.txt").write_text("\n\n   \n", encoding="utf-8")
    with open(docs / "huge.txt", "wb") as f:
        f.truncate(3 * 2**20)
    (docs / "good.md").write_text("# Good\n\nThis one is fine.\n", encoding="utf-8")
    store = KnowledgeStore(tmp_path / "data")
    kb = store.create("local", "h", embedder.name, embedder.dim)
    lines = []
    report = add_files(store, kb, [str(docs), str(docs / "missing.pdf")], embedder, max_bytes=2**20,
                       report_line=lambda o: o.status == "failed" and lines.append(f"{o.path}: {o.detail}"))
    failed = {os.path.basename(o.path): o.detail for o in report.failed}
    print("\n" + "\n".join(lines))
    assert set(failed) == {"locked.pdf", "broken.docx", "garbage.pdf", "empty.md", "blank.txt", "huge.txt",
                           "missing.pdf"}
    assert "encrypted" in failed["locked.pdf"] and "password" in failed["locked.pdf"]
    assert "DOCX" in failed["broken.docx"] and str(docs) not in failed["broken.docx"]
    assert "PDF" in failed["garbage.pdf"]
    assert failed["empty.md"] == "empty file" and failed["blank.txt"] == "no text found"
    assert "too large" in failed["huge.txt"] and "no such file" in failed["missing.pdf"]
    assert all("\n" not in line for line in lines) and len(lines) == 7
    assert [d["name"] for d in store.documents(kb)] == ["good.md"]
    assert store.counts(kb) == {"documents": 1, "chunks": 1, "fts": 1, "vectors": 1}


def test_parse_rejects_unsupported_and_binary(tmp_path):
    (tmp_path / "a.exe").write_bytes(b"MZ")
    (tmp_path / "b.txt").write_bytes(b"\x00\x01binary")
    with pytest.raises(BadDocument, match="unsupported"):
        parse(tmp_path / "a.exe")
    with pytest.raises(BadDocument, match="binary"):
        parse(tmp_path / "b.txt")


def test_deleting_a_document_removes_every_trace(tmp_path, embedder):
    docs = write_corpus(tmp_path / "docs")
    store = KnowledgeStore(tmp_path / "data")
    kb = store.create("local", "h", embedder.name, embedder.dim)
    add_files(store, kb, [str(docs)], embedder)
    doc = store.document(kb, "security.txt")
    ids = [c["id"] for c in store.chunks(kb, doc)]
    assert ids and (store.root / doc["file"]).is_file()
    total = store.counts(kb)
    store.remove(kb, "security.txt")
    db = store._db()
    marks = ",".join("?" * len(ids))
    assert db.execute("SELECT COUNT(*) FROM documents WHERE id = ?", (doc["id"],)).fetchone()[0] == 0
    assert db.execute(f"SELECT COUNT(*) FROM chunks WHERE id IN ({marks})", ids).fetchone()[0] == 0
    assert db.execute(f"SELECT COUNT(*) FROM kb_terms_{kb['id']} WHERE rowid IN ({marks})", ids).fetchone()[0] == 0
    assert db.execute(f"SELECT COUNT(*) FROM kb_vectors_{kb['id']} WHERE rowid IN ({marks})", ids).fetchone()[0] == 0
    assert db.execute(f"SELECT COUNT(*) FROM kb_terms_{kb['id']} WHERE kb_terms_{kb['id']} MATCH '钓鱼'").fetchone()[0] == 0
    assert not (store.root / doc["file"]).exists()
    after = store.counts(kb)
    assert after == {k: v - (1 if k == "documents" else len(ids)) for k, v in total.items()}
    for mode in ("lexical", "dense", "hybrid"):
        assert all(h.document != "security.txt" for h in search(store, kb, "钓鱼邮件 密码", embedder, top_k=50, mode=mode))
    with pytest.raises(NotFound):
        store.document(kb, "security.txt")
    # and the whole knowledge base: no row, no term or vector table, no files
    store.delete("local", "h")
    assert store.counts() == {"documents": 0, "chunks": 0, "fts": 0}
    for table in (f"kb_vectors_{kb['id']}", f"kb_terms_{kb['id']}"):
        assert db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0] == 0
    assert not (store.files / str(kb["id"])).exists()


def test_one_owner_never_retrieves_anothers_documents(tmp_path, embedder):
    store = KnowledgeStore(tmp_path / "data")
    alice, bob = "key:alice", "key:bob"
    a = store.create(alice, "handbook", embedder.name, embedder.dim)
    b = store.create(bob, "handbook", embedder.name, embedder.dim)       # the same name, another owner
    (tmp_path / "a.md").write_text("# Secret\n\nThe launch code for project Falcon is 7421.\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# Menu\n\nThe cafeteria serves noodles on Fridays.\n", encoding="utf-8")
    add_files(store, a, [str(tmp_path / "a.md")], embedder)
    add_files(store, b, [str(tmp_path / "b.md")], embedder)
    assert [k["name"] for k in store.list(bob)] == ["handbook"] and store.list("local") == []
    bobs = store.get(bob, "handbook")
    for mode in ("lexical", "dense", "hybrid"):
        hits = search(store, bobs, "launch code project Falcon", embedder, top_k=10, mode=mode)
        assert all("Falcon" not in h.text for h in hits), mode
    assert [d["name"] for d in store.documents(bobs)] == ["b.md"]
    with pytest.raises(NotFound):
        store.document(bobs, "a.md")
    with pytest.raises(NotFound):
        store.get("local", "handbook")
    store.delete(bob, "handbook")
    assert store.get(alice, "handbook")["id"] == a["id"] and store.counts(a)["vectors"] == 1


def test_migrations_are_numbered_and_reopen(tmp_path):
    store = KnowledgeStore(tmp_path / "data")
    assert store.version == len(MIGRATIONS)
    store.close()
    assert KnowledgeStore(tmp_path / "data").version == len(MIGRATIONS)


def test_a_version_1_store_opens_with_each_knowledge_bases_terms_apart(tmp_path):
    """Version 1 kept every knowledge base's terms in one FTS5 table; migration 2 gives each its
    own, so a database written by the first glmkit still searches, each owner's alone."""
    old = KnowledgeStore(tmp_path / "data", version=1)
    db = old._db()
    db.execute("BEGIN")
    for kb_id, owner, text in ((1, "key:alice", "The launch code for project Falcon is 7421."),
                               (2, "key:bob", "The cafeteria serves noodles; project Falcon pays.")):
        db.execute("INSERT INTO kbs (id, owner, name, embedder, dim, created) VALUES (?, ?, 'h', 'm', 2, 0)",
                   (kb_id, owner))
        db.execute(f"CREATE VIRTUAL TABLE kb_vectors_{kb_id} USING vec0(embedding float[2] distance_metric=cosine)")
        db.execute("INSERT INTO documents (id, kb_id, name, source, kind, sha256, bytes, file, added) "
                   "VALUES (?, ?, 'a.md', 'a.md', 'markdown', ?, 1, '', 0)", (kb_id, kb_id, str(kb_id)))
        db.execute("INSERT INTO chunks (id, kb_id, document_id, seq, text, sha256) VALUES (?, ?, ?, 0, ?, ?)",
                   (kb_id, kb_id, kb_id, text, str(kb_id)))
        db.execute("INSERT INTO chunks_fts (rowid, terms) VALUES (?, ?)", (kb_id, text))
        db.execute(f"INSERT INTO kb_vectors_{kb_id} (rowid, embedding) VALUES (?, ?)",
                   (kb_id, struct.pack("<2f", 1.0, 0.0)))
    db.execute("COMMIT")
    old.close()
    store = KnowledgeStore(tmp_path / "data")
    assert store.version == len(MIGRATIONS)
    assert store._db().execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'chunks_fts'").fetchone()[0] == 0
    assert store.counts(store.get("key:alice", "h")) == {"documents": 2, "chunks": 2, "fts": 2, "vectors": 1}
    for owner, want in (("key:alice", "7421"), ("key:bob", "noodles")):
        hits = search(store, store.get(owner, "h"), "project Falcon", top_k=5, mode="lexical")
        assert [h.text for h in hits] == [t for t in [hits[0].text] if want in t]


def test_kb_command(tmp_path, capsys, monkeypatch, embedder):
    from glmkit.cli import main
    monkeypatch.setenv("GLMKIT_DATA_DIR", str(tmp_path / "data"))
    docs = write_corpus(tmp_path / "docs")
    (docs / "empty.md").write_text("", encoding="utf-8")
    assert main(["kb", "create", "handbook"]) == 0
    assert main(["kb", "add", "handbook", str(docs)]) == 1            # one bad file: status 1, the rest added
    out = capsys.readouterr()
    assert "5 added" in out.out and "1 failed" in out.out
    assert out.err.count("\n") == 1 and "empty.md: empty file" in out.err
    assert main(["kb", "list"]) == 0 and "handbook\t5 documents" in capsys.readouterr().out
    assert main(["kb", "search", "handbook", "How long is parental leave?", "--top-k", "2", "--json"]) == 0
    import json
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and "sixteen weeks" in hits[0]["text"] and hits[0]["document"] == "leave.md"
    assert {"document", "position", "score", "text"} <= set(hits[0])
    assert main(["kb", "search", "handbook", "per diem in Europe"]) == 0
    assert "travel.pdf · page 2" in capsys.readouterr().out
    assert main(["kb", "export", "handbook", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "travel.pdf").is_file() and (tmp_path / "out" / "passages.jsonl").is_file()
    assert main(["kb", "rm", "handbook", "travel.pdf"]) == 0
    capsys.readouterr()
    assert main(["kb", "show", "handbook"]) == 0 and "travel.pdf" not in capsys.readouterr().out
    assert main(["kb", "rm", "handbook", "nope.pdf"]) == 1
    assert main(["kb", "delete", "handbook"]) == 0
    assert main(["kb", "search", "handbook", "x"]) == 1


def test_vector_bytes_roundtrip():
    from glmkit.knowledge.index import vector_bytes
    assert struct.unpack("<3f", vector_bytes([1.0, 0.5, -2.0])) == (1.0, 0.5, -2.0)


def test_dense_search_from_memory_is_sqlite_vecs_and_sees_every_change(tmp_path):
    """The in-memory copy of a knowledge base's vectors answers as sqlite-vec's KNN does, and a
    change made by another connection (another process: the server while `glmkit kb add` runs)
    is seen by the next query."""
    import random
    rng = random.Random(3)

    def unit(dim=8):
        v = [rng.gauss(0, 1) for _ in range(dim)]
        return [x / sum(y * y for y in v) ** 0.5 for x in v]

    def add(store, kb, name, n):
        src = tmp_path / name
        src.write_text(name)
        chunks = [Chunk(i, f"{name} passage {i}", "", None, i, None) for i in range(n)]
        store.put(kb, {"name": name, "source": str(src), "kind": "text", "sha256": name, "bytes": 1, "pages": None},
                  chunks, [struct.pack("<8f", *unit()) for _ in chunks], src)

    store = KnowledgeStore(tmp_path / "data")
    kb = store.create("local", "v", "m", 8)
    add(store, kb, "a.txt", 40)

    def from_sqlite_vec(q, k):
        rows = store._db().execute(f"SELECT rowid, distance FROM kb_vectors_{kb['id']} WHERE embedding MATCH ? AND k = ?",
                                   (q, k))
        return [(r["rowid"], 1.0 - r["distance"]) for r in rows]

    for _ in range(5):
        q = struct.pack("<8f", *[3 * x for x in unit()])          # not unit length: cosine all the same
        got, want = store.dense(kb, q, 10), from_sqlite_vec(q, 10)
        assert [i for i, _ in got] == [i for i, _ in want]
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(got, want))
    assert len(store.dense(kb, q, 100)) == 40
    other = KnowledgeStore(tmp_path / "data")                   # another process's connection
    add(other, kb, "b.txt", 5)
    assert len(store.dense(kb, q, 100)) == 45
    other.remove(kb, "a.txt")
    got = store.dense(kb, q, 100)
    assert len(got) == 5 and [i for i, _ in got] == [i for i, _ in from_sqlite_vec(q, 100)]


def test_a_words_only_knowledge_base_has_no_vectors(tmp_path):
    """Made without an embedding model (the console of a --no-embeddings server): nothing is
    embedded and no vector table is made (earlier ones held a placeholder for each passage:
    migration 4 drops them); retrieval is by words, and adding, replacing and removing work."""
    from glmkit.knowledge.index import KnowledgeError
    from glmkit.knowledge.ingest import WordsOnly, add_file

    class NoEmbedding(WordsOnly):
        def embed(self, texts):
            raise AssertionError("a words-only knowledge base embeds nothing")

    md = tmp_path / "handbook.md"
    md.write_text("# Parking\n\nThe parking lottery is drawn every March.\n", encoding="utf-8")
    store = KnowledgeStore(tmp_path / "data")
    kb = store.create("local", "w", WordsOnly.name, WordsOnly.dim)
    db = store._db()
    assert db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = ?", (f"kb_vectors_{kb['id']}",)).fetchone()[0] == 0
    assert add_file(store, kb, md, NoEmbedding()).status == "added"
    md.write_text("# Parking\n\nThe parking lottery is drawn every April.\n", encoding="utf-8")
    assert add_file(store, kb, md, NoEmbedding()).status == "replaced"
    assert store.counts(kb) == {"documents": 1, "chunks": 1, "fts": 1, "vectors": 0}
    hits = search(store, kb, "when is the parking lottery?", NoEmbedding())
    assert len(hits) == 1 and "April" in hits[0].text and hits[0].dense_rank is None
    with pytest.raises(KnowledgeError, match="words only"):
        search(store, kb, "parking", NoEmbedding(), mode="dense")
    store.remove(kb, "handbook.md")
    assert store.counts(kb) == {"documents": 0, "chunks": 0, "fts": 0, "vectors": 0}
    store.delete("local", "w")
    store.close()
    # a store of version 3 with a words-only knowledge base's placeholder vectors
    old = KnowledgeStore(tmp_path / "old", version=3)
    kb = old.create("local", "w", WordsOnly.name, WordsOnly.dim)
    old._db().execute(f"CREATE VIRTUAL TABLE kb_vectors_{kb['id']} USING vec0(embedding float[1] distance_metric=cosine)")
    old.close()
    store = KnowledgeStore(tmp_path / "old")
    assert store.version == len(MIGRATIONS)
    assert store._db().execute("SELECT COUNT(*) FROM sqlite_master WHERE name = ?",
                               (f"kb_vectors_{kb['id']}",)).fetchone()[0] == 0
    assert add_file(store, store.get("local", "w"), md, NoEmbedding()).status == "added"
