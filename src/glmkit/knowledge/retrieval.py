"""Hybrid retrieval: the lexical index (FTS5 over jieba-segmented terms, BM25) and the dense one
(the embedding model's vectors, cosine), fused by reciprocal rank.

Reciprocal rank fusion (Cormack et al., 2009): a passage's score is the sum over the two ranked
lists of 1 / (RRF_K + rank).  It needs no calibration between BM25's and cosine's scales, and a
passage that both indexes rank high rises above one that only one of them likes.  The score
reported is that sum divided by its largest possible value (first in both lists), so 1.0 is the
top and a passage first in only one list scores 0.5; `min_score` drops passages below it.
`min_similarity` drops dense candidates whose cosine similarity is below it before fusing.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .index import KnowledgeError, KnowledgeStore, terms, vector_bytes, words_only

RRF_K = 60
CANDIDATES = 50          # from each index, before fusing
MODES = ("hybrid", "lexical", "dense")
MAX_TERMS = 32

# words that every question has and no passage is found by
_STOP = set("""a an and are as at be by can do does for from how i if in is it its me my of on or our
should the their there this to us was we what when where which who why will with you your
的 了 是 在 和 与 及 吗 呢 吧 啊 么 什么 怎么 怎样 如何 多少 哪些 哪个 哪里 谁 几 吗 请问 我们 我 你 有 要 需要 可以 会""".split())


@dataclass
class Hit:
    document: str
    seq: int
    heading: str
    page: int | None
    line: int | None
    paragraph: int | None
    text: str
    score: float
    lexical_rank: int | None = None
    dense_rank: int | None = None
    similarity: float | None = None

    @property
    def position(self) -> str:
        parts = []
        if self.page is not None:
            parts.append(f"page {self.page}")
        if self.heading:
            parts.append(f"§ {self.heading}")
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.paragraph is not None:
            parts.append(f"paragraph {self.paragraph}")
        return ", ".join(parts) or f"passage {self.seq + 1}"

    def as_dict(self) -> dict:
        return dict(asdict(self), position=self.position)


def fts_query(query: str) -> str:
    """The query as an FTS5 expression: its terms (Chinese segmented as the passages were), each
    quoted (never FTS syntax), OR'ed so BM25 ranks by how many and how rare."""
    words = []
    for w in re.findall(r"\w+", terms(query).lower()):
        if w not in _STOP and w not in words:
            words.append(w)
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words[:MAX_TERMS])


def search(store: KnowledgeStore, kb: dict, query: str, embedder=None, top_k: int = 5, mode: str = "hybrid",
           min_score: float = 0.0, min_similarity: float | None = None, query_vector=None) -> list[Hit]:
    """The `top_k` passages of knowledge base `kb` (a row from store.get(owner, name)) for `query`.
    `embedder` (or a ready `query_vector`) is needed unless mode is "lexical"."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if words_only(kb):               # it has no vectors: words are all there is
        if mode == "dense":
            raise KnowledgeError(f"{kb['name']!r} is indexed by words only (it was made without an embedding model)")
        mode = "lexical"
    lexical: list[tuple[int, float]] = []
    dense: list[tuple[int, float]] = []
    if mode in ("hybrid", "lexical"):
        lexical = store.lexical(kb, fts_query(query), CANDIDATES)
    if mode in ("hybrid", "dense"):
        if query_vector is None:
            query_vector = embedder.embed([query])[0][0]
        dense = store.dense(kb, vector_bytes(query_vector), CANDIDATES)
        if min_similarity is not None:
            dense = [(i, s) for i, s in dense if s >= min_similarity]
    lists = [x for x in (lexical, dense) if mode == "hybrid" or x]
    top = len(lists) / (RRF_K + 1) if lists else 1.0
    fused: dict[int, float] = {}
    for ranked in (lexical, dense):
        for rank, (cid, _) in enumerate(ranked, start=1):
            fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + rank)
    order = sorted(fused, key=lambda c: -fused[c])
    order = [c for c in order if fused[c] / top >= min_score][:top_k]
    rows = store.passages(kb, order)
    lex_rank = {cid: r for r, (cid, _) in enumerate(lexical, start=1)}
    dense_rank = {cid: (r, s) for r, (cid, s) in enumerate(dense, start=1)}
    hits = []
    for cid in order:
        r = rows.get(cid)
        if r is None:
            continue
        d = dense_rank.get(cid)
        hits.append(Hit(r["document"], r["seq"], r["heading"], r["page"], r["line"], r["paragraph"], r["text"],
                        round(fused[cid] / top, 4), lex_rank.get(cid), d[0] if d else None,
                        round(d[1], 4) if d else None))
    return hits
