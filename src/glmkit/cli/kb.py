"""`glmkit kb`: knowledge bases at the terminal (owner "local"): create, add files, list, show,
search, remove a document, export, delete (glmkit.knowledge does the work)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import GlmkitError
from .options import default_data_dir, positive

OWNER = "local"          # the terminal's owner, as for conversations (server/store.py's owner_of(None))


def add_parser(sub) -> None:
    kb = sub.add_parser("kb", help="knowledge bases: add your documents, search them",
                        description="Knowledge bases of your own documents (PDF, DOCX, Markdown, HTML, text), "
                                    "kept under the data directory and searched by meaning and by words.")
    kb.set_defaults(run=lambda args: (kb.print_help(), 0)[1])
    cmds = kb.add_subparsers(dest="kb_command", metavar="ACTION")

    def command(name, help, run):
        p = cmds.add_parser(name, help=help, description=help)
        p.set_defaults(run=run)
        p.add_argument("--data-dir", metavar="DIR", default=None,
                       help="where knowledge bases are kept (default: $GLMKIT_DATA_DIR, else ~/.local/share/glmkit)")
        return p

    p = command("create", "create a knowledge base", cmd_create)
    p.add_argument("name")
    p.add_argument("--embedding-model", metavar="DIR", help="a BERT sentence-embedding model directory "
                   "(default: all-MiniLM-L6-v2, as `glmkit serve` uses); the knowledge base keeps it")
    p = command("add", "add files (or folders) to a knowledge base; a changed file replaces its earlier version",
                cmd_add)
    p.add_argument("name")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--max-mb", type=positive, default=100, metavar="N", help="skip files larger than N MiB (default 100)")
    p.add_argument("--embedding-model", metavar="DIR", help="override the knowledge base's embedding model")
    p = command("list", "list your knowledge bases", cmd_list)
    p.add_argument("--json", action="store_true")
    p = command("show", "list a knowledge base's documents", cmd_show)
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p = command("search", "the passages a question retrieves, with document, position and score", cmd_search)
    p.add_argument("name")
    p.add_argument("query")
    p.add_argument("-k", "--top-k", type=positive, default=5, metavar="N", help="how many passages (default 5)")
    p.add_argument("--min-score", type=float, default=0.0, metavar="S",
                   help="drop passages whose fused score (1.0 = first by words and by meaning) is below S")
    p.add_argument("--min-similarity", type=float, default=None, metavar="S",
                   help="drop meaning matches whose cosine similarity is below S")
    p.add_argument("--mode", choices=["hybrid", "lexical", "dense"], default="hybrid",
                   help="hybrid (default): words and meaning fused; lexical or dense: one index alone")
    p.add_argument("--json", action="store_true")
    p.add_argument("--embedding-model", metavar="DIR", help="override the knowledge base's embedding model")
    p = command("rm", "remove documents from a knowledge base (passages, vectors and the stored file)", cmd_rm)
    p.add_argument("name")
    p.add_argument("documents", nargs="+", metavar="DOCUMENT")
    p = command("delete", "delete a knowledge base and everything in it", cmd_delete)
    p.add_argument("name")
    p = command("export", "copy a knowledge base's files and passages (passages.jsonl) into a folder", cmd_export)
    p.add_argument("name")
    p.add_argument("out", metavar="DIR")


def _store(args):
    from ..knowledge.index import KnowledgeStore
    return KnowledgeStore(args.data_dir or default_data_dir())


def _embedder(kb: dict | None, override: str | None):
    from ..knowledge.index import words_only
    from ..knowledge.ingest import WordsOnly, load_embedder
    if kb is not None and words_only(kb):      # made by a console without an embedding model
        return WordsOnly()
    path = override or (kb["embedder_path"] if kb else "") or None
    embedder = load_embedder(path)
    if kb is not None and embedder.dim != kb["dim"]:
        raise GlmkitError(f"{kb['name']!r} was indexed with {kb['embedder']} ({kb['dim']} dimensions); "
                          f"{embedder.name} gives {embedder.dim}")
    return embedder


def cmd_create(args) -> int:
    store = _store(args)
    embedder = _embedder(None, args.embedding_model)
    path = str(Path(args.embedding_model).resolve()) if args.embedding_model else ""
    kb = store.create(OWNER, args.name, embedder.name, embedder.dim, path)
    print(f"created {kb['name']} (embedding model {kb['embedder']}, {kb['dim']} dimensions) in {store.root}")
    return 0


def cmd_add(args) -> int:
    from ..knowledge.ingest import add_files
    store = _store(args)
    kb = store.get(OWNER, args.name)
    embedder = _embedder(kb, args.embedding_model)

    progress = sys.stderr.isatty()

    def line(o):
        if o.status == "failed":
            if progress:
                from tqdm import tqdm
                tqdm.write(f"skipped {o.path}: {o.detail}", file=sys.stderr)     # above the bar, not through it
            else:
                print(f"skipped {o.path}: {o.detail}", file=sys.stderr)

    report = add_files(store, kb, args.files, embedder, max_bytes=args.max_mb * 2**20,
                       progress=progress, report_line=line)
    tally: dict[str, int] = {}
    for o in report.outcomes:
        tally[o.status] = tally.get(o.status, 0) + 1
    chunks = sum(o.chunks for o in report.outcomes)
    print(f"{kb['name']}: " + ", ".join(f"{n} {s}" for s, n in tally.items()) + f"; {chunks} passages indexed")
    return 1 if report.failed else 0


def cmd_list(args) -> int:
    kbs = _store(args).list(OWNER)
    if args.json:
        print(json.dumps([{k: r[k] for k in ("name", "embedder", "dim", "documents", "chunks", "created")} for r in kbs],
                         indent=2))
        return 0
    if not kbs:
        print("no knowledge bases yet (`glmkit kb create NAME`)", file=sys.stderr)
    for r in kbs:
        print(f"{r['name']}\t{r['documents']} documents\t{r['chunks']} passages\t{r['embedder']}")
    return 0


def cmd_show(args) -> int:
    store = _store(args)
    docs = store.documents(store.get(OWNER, args.name))
    if args.json:
        print(json.dumps([{k: d[k] for k in ("name", "kind", "pages", "bytes", "chunks", "sha256", "source", "added")}
                          for d in docs], ensure_ascii=False, indent=2))
        return 0
    if not docs:
        print(f"{args.name} has no documents (`glmkit kb add {args.name} FILE...`)", file=sys.stderr)
    for d in docs:
        pages = f", {d['pages']} pages" if d["pages"] else ""
        print(f"{d['name']}\t{d['kind']}{pages}\t{d['chunks']} passages\t{d['bytes']} bytes")
    return 0


def cmd_search(args) -> int:
    from ..knowledge.retrieval import search
    store = _store(args)
    kb = store.get(OWNER, args.name)
    embedder = None if args.mode == "lexical" else _embedder(kb, args.embedding_model)
    hits = search(store, kb, args.query, embedder, top_k=args.top_k, mode=args.mode,
                  min_score=args.min_score, min_similarity=args.min_similarity)
    if args.json:
        print(json.dumps([h.as_dict() for h in hits], ensure_ascii=False, indent=2))
        return 0
    if not hits:
        print("no passage matches", file=sys.stderr)
    for n, h in enumerate(hits, start=1):
        print(f"[{n}] {h.document} · {h.position} · score {h.score:.3f}")
        print("    " + h.text.replace("\n", "\n    "))
        print()
    return 0


def cmd_rm(args) -> int:
    store = _store(args)
    kb = store.get(OWNER, args.name)
    status = 0
    for name in args.documents:
        try:
            doc = store.remove(kb, name)
        except GlmkitError as e:
            print(f"glmkit: error: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"removed {doc['name']} from {kb['name']}")
    return status


def cmd_delete(args) -> int:
    _store(args).delete(OWNER, args.name)
    print(f"deleted knowledge base {args.name}")
    return 0


def cmd_export(args) -> int:
    store = _store(args)
    n = store.export(store.get(OWNER, args.name), Path(args.out))
    print(f"exported {n} documents and passages.jsonl to {args.out}")
    return 0


class ChatKnowledge:
    """`glmkit chat --kb NAME`: the knowledge base each user message is answered from (owner
    "local"), opened before the model loads so that a wrong name fails at once."""

    def __init__(self, name: str, data_dir: str | None, top_k: int = 5):
        from ..knowledge.index import KnowledgeStore
        self.store = KnowledgeStore(data_dir or default_data_dir())
        self.kb = self.store.get(OWNER, name)
        self.top_k = top_k
        self.embedder = _embedder(self.kb, None)

    def passages(self, question: str) -> list[dict]:
        """The numbered passages (chat.knowledge_context.passages) retrieved for `question`."""
        from ..chat.knowledge_context import passages
        from ..knowledge.retrieval import search
        return passages(search(self.store, self.kb, question, self.embedder, top_k=self.top_k))

    def close(self) -> None:
        self.store.close()
