"""Adding files to a knowledge base: parse, chunk, embed (batched; passages already embedded in
this knowledge base are not embedded again), index; one line for each file that cannot be added,
and the others go on.

A document is named by its file name (parent folders are added when another file of that name,
from elsewhere, is already there).  The same content under any name is skipped; the same path
with new content replaces the document's passages in one transaction.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GlmkitError
from .chunking import chunk
from .index import WORDS_ONLY, KnowledgeStore, vector_bytes, words_only
from .parsers import MAX_BYTES, BadDocument, parse, supported

BATCH = 64      # bf16 on 2 cores: 64 passages a batch ran 1.3x faster than 32, and 128 no faster than 64


def load_embedder(path: str | None):
    """The embedding model glmkit serves (models/bert.py; all-MiniLM-L6-v2 unless `path`), for `glmkit
    kb` (the server's console and /v1/embeddings load it in float32: server/embeddings.py); torch is
    imported here.  Its weights are bfloat16 where the CPU multiplies those natively (AMX,
    AVX512-BF16): ingestion's time is the embedding's, and that is about 3x faster there, with
    vectors within cosine 0.996 of float32's (the same model's either way: a knowledge base made
    with one is searched with the other)."""
    import torch

    from ..models.bert import Embedder, default_embedding_path, native_bf16
    return Embedder(Path(path) if path else default_embedding_path(),
                    dtype=torch.bfloat16 if native_bf16() else torch.float32)


class WordsOnly:
    """The "embedder" of a knowledge base indexed by words only (index.WORDS_ONLY): add_file
    embeds nothing for it and it has no vector table; retrieval searches it by words alone
    (retrieval.search)."""
    name, dim = WORDS_ONLY, 1

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        return [[1.0] for _ in texts], 0


def embed(embedder, texts: list[str], batch: int = BATCH, progress=None) -> list[list[float]]:
    """Texts -> vectors, in batches of similar length (less padding), in the texts' order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list = [None] * len(texts)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        vecs, _ = embedder.embed([texts[i] for i in idx])
        for i, v in zip(idx, vecs):
            out[i] = v
        if progress is not None:
            progress(len(idx))
    return out


@dataclass
class Outcome:
    path: str
    status: str                  # added, replaced, unchanged, duplicate, failed
    name: str = ""
    detail: str = ""
    chunks: int = 0
    pages: int | None = None


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def expand(paths: list[str]) -> tuple[list[Path], list[Outcome]]:
    """Files named (a folder: its supported files, recursively; a quoted pattern: its matches)."""
    files, missing = [], []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(f for f in Path(p).rglob("*") if f.is_file() and supported(f))
        elif os.path.exists(p):
            files.append(Path(p))
        elif glob.has_magic(p):
            found = sorted(Path(f) for f in glob.glob(p, recursive=True) if os.path.isfile(f))
            files += found
            if not found:
                missing.append(Outcome(p, "failed", detail="no file matches"))
        else:
            missing.append(Outcome(p, "failed", detail="no such file"))
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, missing


def add_files(store: KnowledgeStore, kb: dict, paths: list[str], embedder, max_bytes: int = MAX_BYTES,
              progress: bool = False, report_line=None) -> Report:
    """Add each file; `report_line(outcome)` is called as each one finishes (the CLI prints failures
    there, one line each)."""
    files, report_outcomes = expand(paths)
    report = Report(list(report_outcomes))
    for o in report_outcomes:
        if report_line:
            report_line(o)
    bar = None
    if progress and files:
        from tqdm import tqdm
        bar = tqdm(total=len(files), unit="file", desc=f"adding to {kb['name']}", leave=False)
    try:
        for f in files:
            if bar is not None:
                bar.set_postfix_str(f.name[:30])
            try:
                o = add_file(store, kb, f, embedder, max_bytes)
            except GlmkitError as e:          # BadDocument included: one line, and on with the rest
                o = Outcome(str(f), "failed", detail=str(e))
            except OSError as e:
                o = Outcome(str(f), "failed", detail=f"cannot read: {e.strerror or e}")
            except (Exception, RecursionError) as e:  # a parser's own failure must not stop the others
                o = Outcome(str(f), "failed", detail=f"could not be read ({type(e).__name__})")
            report.outcomes.append(o)
            if bar is not None:
                bar.update(1)
            if report_line:
                report_line(o)
    finally:
        if bar is not None:
            bar.close()
    return report


def add_file(store: KnowledgeStore, kb: dict, path: Path, embedder, max_bytes: int = MAX_BYTES) -> Outcome:
    source = str(path.resolve())
    if not supported(path):
        raise BadDocument(f"unsupported file type {path.suffix or '(none)'!r} (PDF, DOCX, Markdown, HTML or text)")
    size = path.stat().st_size
    if size > max_bytes:         # before reading it whole to hash it
        raise BadDocument(f"too large: {size / 2**20:.1f} MiB (the limit is {max_bytes / 2**20:.0f} MiB)")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    earlier = store.by_source(kb, source)
    if earlier is not None and earlier["sha256"] == sha:
        return Outcome(str(path), "unchanged", earlier["name"])
    same = store.by_hash(kb, sha)
    if same is not None and (earlier is None or same["id"] != earlier["id"]):
        return Outcome(str(path), "duplicate", same["name"], detail=f"the same content as {same['name']!r}")
    parsed = parse(path, max_bytes)
    chunks = chunk(parsed.blocks)
    seen, unique = set(), []
    for c in chunks:                       # a page header repeated on every page: indexed once
        if c.sha256 not in seen:
            seen.add(c.sha256)
            unique.append(c)
    for i, c in enumerate(unique):
        c.seq = i
    known = store.known_vectors(kb, [c.sha256 for c in unique])
    todo = [c for c in unique if c.sha256 not in known]
    if words_only(kb):                     # no vectors at all
        known, todo = {c.sha256: None for c in unique}, []
    if todo:
        if embedder.dim != kb["dim"]:
            raise GlmkitError(f"the embedding model gives {embedder.dim} dimensions; {kb['name']!r} holds {kb['dim']}")
        for c, v in zip(todo, embed(embedder, [c.for_index() for c in todo])):
            known[c.sha256] = vector_bytes(v)
    name = earlier["name"] if earlier is not None else _free_name(store, kb, path)
    meta = {"name": name, "source": source, "kind": parsed.kind, "sha256": sha, "bytes": size, "pages": parsed.pages}
    store.put(kb, meta, unique, [known[c.sha256] for c in unique], path, replace=earlier)
    return Outcome(str(path), "replaced" if earlier is not None else "added", name, chunks=len(unique),
                   pages=parsed.pages)


def _free_name(store: KnowledgeStore, kb: dict, path: Path) -> str:
    parts = path.resolve().parts
    for n in range(1, len(parts)):
        name = "/".join(parts[-n:])
        if not store.name_taken(kb, name):
            return name
    return str(path.resolve())
