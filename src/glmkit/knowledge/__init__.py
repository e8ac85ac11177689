"""Knowledge bases: a user's own documents, split into passages that a question can retrieve.

parsers.py reads PDF (pypdf), DOCX (python-docx), Markdown, HTML and plain text into blocks that
keep where they came from (page, heading path, line or paragraph); chunking.py packs blocks into
passages that respect headings and sentences, in Chinese and English; index.py keeps knowledge
bases, documents, passages, their FTS5 terms and their vectors (sqlite-vec) in one SQLite file
under the data directory, each knowledge base scoped by owner as the conversation store is;
retrieval.py answers a query with both indexes fused by reciprocal rank; ingest.py adds files
(parse, chunk, embed in batches, index), one clear line for each file it cannot read.

Document text is data: it is stored and returned raw, never turned into a template's special
tokens.  This package never imports the server; torch is imported only when texts are embedded.
"""
