"""Knowledge bases: ingestion speed for text PDFs and retrieval latency at 10,000 passages.

    PYTHONPATH=src .venv/bin/python bench/kb_ingest.py [--pages 60] [--chunks 10000] [--queries 200]

1. Ingestion: a text PDF of --pages pages (about 300 words each, written with fpdf2) is added to a
   fresh knowledge base: parse (pypdf), chunk, embed (the default embedding model, batched), index.
   Goal: >= 20 pages/s, embedding included.
2. Retrieval: a knowledge base of --chunks passages (synthetic English and Chinese sentences,
   random unit vectors: brute-force vector search costs the same whatever the vectors hold), then
   --queries queries through retrieval.search with the query's vector given (retrieval only:
   jieba on the query, FTS5 BM25, sqlite-vec KNN, fusion, reading the passages).  Goal: p95 <= 50 ms.
   The query embedding's own time is measured apart.
Everything is written under a temporary directory and removed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from glmkit.knowledge.chunking import Chunk  # noqa: E402
from glmkit.knowledge.index import KnowledgeStore, vector_bytes  # noqa: E402
from glmkit.knowledge.ingest import add_files, load_embedder  # noqa: E402
from glmkit.knowledge.retrieval import search  # noqa: E402

WORDS = ("policy employee travel expense report approval manager budget contract invoice payment "
         "security password laptop network office building access badge parking meeting holiday "
         "vacation leave training course conference salary bonus review quarter project deadline "
         "customer support ticket release server database backup incident response audit").split()
ZH = "员工 报销 差旅 审批 经理 预算 合同 发票 付款 安全 密码 电脑 网络 办公室 门禁 停车 会议 假期 年假 培训 课程 工资 奖金 项目 客户 服务器 数据库 备份 事故 审计".split()


def sentence(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return "".join(rng.choices(ZH, k=rng.randint(6, 14))) + "。"
    words = rng.choices(WORDS, k=rng.randint(8, 18))
    return " ".join(words).capitalize() + "."


def write_pdf(path: Path, pages: int, rng: random.Random) -> None:
    import fpdf
    pdf = fpdf.FPDF()
    pdf.set_font("helvetica", size=10)
    for p in range(pages):
        pdf.add_page()
        for _ in range(4):
            para = " ".join(" ".join(rng.choices(WORDS, k=rng.randint(10, 20))).capitalize() + "."
                            for _ in range(5))
            pdf.multi_cell(0, 5, para)
            pdf.ln(3)
    pdf.output(str(path))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=60)
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    rng = random.Random(7)
    import torch
    print(f"torch threads {torch.get_num_threads()}")
    embedder = load_embedder(None)
    embedder.embed(["warm up"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. ingestion
        pdf = tmp / "manual.pdf"
        write_pdf(pdf, args.pages, rng)
        store = KnowledgeStore(tmp / "data")
        kb = store.create("local", "bench", embedder.name, embedder.dim)
        t = time.perf_counter()
        report = add_files(store, kb, [str(pdf)], embedder)
        took = time.perf_counter() - t
        o = report.outcomes[0]
        assert o.status == "added", o
        print(f"ingestion: {args.pages} text PDF pages, {o.chunks} passages in {took:.2f} s: "
              f"{args.pages / took:.1f} pages/s, {o.chunks / took:.1f} passages/s (goal >= 20 pages/s)")

        # 2. retrieval at --chunks passages
        kb = store.create("local", "big", embedder.name, embedder.dim)
        per_doc = 500
        t = time.perf_counter()
        for d in range(0, args.chunks, per_doc):
            n = min(per_doc, args.chunks - d)
            chunks = [Chunk(i, " ".join(sentence(rng) for _ in range(4)), f"Section {i // 10}", None, i, None)
                      for i in range(n)]
            vecs = []
            for _ in range(n):
                v = [rng.gauss(0, 1) for _ in range(embedder.dim)]
                norm = sum(x * x for x in v) ** 0.5
                vecs.append(vector_bytes([x / norm for x in v]))
            src = tmp / f"doc{d}.txt"
            src.write_text(str(d))
            store.put(kb, {"name": src.name, "source": str(src), "kind": "text", "sha256": str(d),
                           "bytes": 1, "pages": None}, chunks, vecs, src)
        print(f"built {store.counts(kb)['vectors']} passages in {time.perf_counter() - t:.1f} s")
        queries = [sentence(rng) if i % 2 else " ".join(rng.choices(WORDS, k=5)) for i in range(args.queries)]
        qvecs = [[rng.gauss(0, 1) for _ in range(embedder.dim)] for _ in queries]
        for q, v in zip(queries[:5], qvecs[:5]):
            search(store, kb, q, top_k=5, query_vector=v)        # warm the page cache
        for mode in ("lexical", "dense", "hybrid"):
            times = []
            for q, v in zip(queries, qvecs):
                t = time.perf_counter()
                search(store, kb, q, top_k=5, mode=mode, query_vector=v)
                times.append((time.perf_counter() - t) * 1000)
            print(f"retrieval only, {mode:7s}: p50 {statistics.median(times):.1f} ms, p95 {percentile(times, 95):.1f} ms"
                  + ("  (goal p95 <= 50 ms)" if mode == "hybrid" else ""))
        times = []
        for q in queries[:50]:
            t = time.perf_counter()
            embedder.embed([q])
            times.append((time.perf_counter() - t) * 1000)
        print(f"query embedding alone: p50 {statistics.median(times):.1f} ms, p95 {percentile(times, 95):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
