"""Documents -> blocks of text that keep their position.

A block is a paragraph-sized piece (a PDF page's text, a DOCX paragraph or table row, a Markdown
or text paragraph, an HTML block element) with the heading path above it and its page, line or
paragraph number.  The parsers:

- PDF: pypdf (pure Python, BSD, kept up; tells an encrypted file from a damaged one).  PyMuPDF is
  faster but AGPL; docling and markitdown bring layout models or many converters and lose the
  page numbers that a citation needs.
- DOCX: python-docx (headings from paragraph styles, tables row by row, in body order).
- Markdown: read line by line (ATX and setext headings, fenced code kept whole); the text is kept
  as written, not rendered.
- HTML: the standard library's html.parser (no script, style or navigation chrome; h1-h6 make
  the heading path).
- Text: UTF-8 (with or without BOM), else GB18030 for older Chinese files.

Anything that cannot be read raises BadDocument with a one-line reason.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from ..errors import GlmkitError

MAX_BYTES = 100 * 1024 * 1024        # larger files are refused (--max-mb)

KINDS = {".pdf": "pdf", ".docx": "docx", ".md": "markdown", ".markdown": "markdown",
         ".html": "html", ".htm": "html", ".txt": "text", ".text": "text", ".rst": "text"}


class BadDocument(GlmkitError):
    """A file that cannot be added; the message is one line saying why."""


@dataclass
class Block:
    text: str
    heading: tuple[str, ...] = ()
    page: int | None = None          # PDF, 1-based
    line: int | None = None          # Markdown and text, 1-based first line
    paragraph: int | None = None     # DOCX, 1-based body paragraph


@dataclass
class Parsed:
    kind: str
    blocks: list[Block] = field(default_factory=list)
    pages: int | None = None


def kind_of(path: str | Path) -> str | None:
    return KINDS.get(Path(path).suffix.lower())


def parse(path: str | Path, max_bytes: int = MAX_BYTES) -> Parsed:
    path = Path(path)
    kind = kind_of(path)
    if kind is None:
        raise BadDocument(f"unsupported file type {path.suffix or '(none)'!r} (PDF, DOCX, Markdown, HTML or text)")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadDocument(f"cannot read: {e.strerror or e}") from None
    if size == 0:
        raise BadDocument("empty file")
    if size > max_bytes:
        raise BadDocument(f"too large: {size / 2**20:.1f} MiB (the limit is {max_bytes / 2**20:.0f} MiB)")
    parsed = {"pdf": _pdf, "docx": _docx, "markdown": _markdown, "html": _html, "text": _text}[kind](path)
    parsed.blocks = [b for b in parsed.blocks if b.text.strip()]
    if not parsed.blocks:
        raise BadDocument("no text found" + (" (a scanned PDF? glmkit does no OCR)" if kind == "pdf" else ""))
    return parsed


# -- PDF -------------------------------------------------------------------------------------
def _pdf(path: Path) -> Parsed:
    import logging

    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PdfReadError
    logging.getLogger("pypdf").setLevel(logging.ERROR)     # its warnings about sloppy files are not ours
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            try:
                ok = reader.decrypt("")           # an owner password alone does not stop reading
            except Exception:                     # noqa: BLE001 (an unsupported cipher, a missing backend)
                ok = 0
            if not ok:
                raise BadDocument("encrypted PDF: it needs a password (save an unprotected copy)")
        blocks = []
        for number, page in enumerate(reader.pages, start=1):
            text = page.extract_text() or ""
            for para in _paragraphs(text):
                blocks.append(Block(para, page=number))
        return Parsed("pdf", blocks, pages=len(reader.pages))
    except BadDocument:
        raise
    except FileNotDecryptedError:
        raise BadDocument("encrypted PDF: it needs a password (save an unprotected copy)") from None
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as e:
        raise BadDocument(f"not a readable PDF ({_one_line(e)})") from None
    except Exception as e:     # pypdf's other refusals (LimitReachedError, NotImplementedError, deep nesting)
        raise BadDocument(f"not a PDF this reader can take ({type(e).__name__}: {_one_line(e)})") from None


def _paragraphs(text: str) -> list[str]:
    """A PDF page's text as paragraphs: blank lines split them; lines inside one are joined
    (with a space between Latin words, nothing between CJK characters), a hyphenated break undone."""
    out = []
    for chunk in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in chunk.splitlines() if ln.strip()]
        if not lines:
            continue
        para = lines[0]
        for ln in lines[1:]:
            if para.endswith("-") and para[-2:-1].isalpha() and ln[:1].islower():
                para = para[:-1] + ln
            elif _cjk(para[-1]) and _cjk(ln[0]):
                para += ln
            else:
                para += " " + ln
        out.append(para)
    return out


def _cjk(ch: str) -> bool:
    return "\u3000" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" or "\uff00" <= ch <= "\uffef"


# -- DOCX ------------------------------------------------------------------------------------
def _docx(path: Path) -> Parsed:
    try:
        import docx
        from docx.opc.exceptions import PackageNotFoundError
        from docx.table import Table
        from docx.text.paragraph import Paragraph
    except ImportError:
        raise BadDocument("reading DOCX needs python-docx (pip install python-docx)") from None
    try:
        document = docx.Document(str(path))
        title: list[str] = []
        heading: list[str] = []
        blocks: list[Block] = []
        number = 0
        for item in document.iter_inner_content():
            number += 1
            if isinstance(item, Paragraph):
                text = item.text.strip()
                level = _heading_level(item.style.name if item.style is not None else "")
                if level == -1 and text:                  # the Title style: above every heading
                    title, heading = [text], []
                    continue
                if level and text:
                    heading = heading[:level - 1] + [text]
                    continue
                blocks.append(Block(text, tuple(title + heading), paragraph=number))
            elif isinstance(item, Table):
                for row in item.rows:
                    cells = []
                    for cell in row.cells:
                        t = " ".join(cell.text.split())
                        if t and (not cells or cells[-1] != t):      # merged cells repeat
                            cells.append(t)
                    blocks.append(Block(" | ".join(cells), tuple(title + heading), paragraph=number))
        return Parsed("docx", blocks)
    except (PackageNotFoundError, zipfile.BadZipFile):
        raise BadDocument("not a readable DOCX (damaged, truncated, or not a Word file)") from None
    except (KeyError, ValueError) as e:
        raise BadDocument(f"not a readable DOCX ({_one_line(e)})") from None
    except Exception as e:            # noqa: BLE001  lxml's XMLSyntaxError and kin: a damaged part
        raise BadDocument(f"not a readable DOCX ({type(e).__name__}: {_one_line(e)})") from None


def _heading_level(style: str) -> int:
    if style == "Title":
        return -1
    m = re.fullmatch(r"(?:Heading|标题)\s*(\d)", style)
    return int(m.group(1)) if m else 0


# -- Markdown and text -----------------------------------------------------------------------
def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise BadDocument("binary data, not text")
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("utf-8", "replace")


_ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _markdown(path: Path) -> Parsed:
    lines = _read_text(path).splitlines()
    heading: list[str] = []
    blocks: list[Block] = []
    para: list[str] = []
    start = 0
    fence = None

    def flush():
        if para:
            blocks.append(Block("\n".join(para).strip(), tuple(heading), line=start))
            para.clear()

    for i, line in enumerate(lines, start=1):
        if fence:
            para.append(line)
            if line.strip().startswith(fence):
                fence = None
                flush()
            continue
        m = _FENCE.match(line)
        if m:
            flush()
            fence, start = m.group(1)[:3], i
            para.append(line)
            continue
        m = _ATX.match(line)
        if m:
            flush()
            level = len(m.group(1))
            heading = heading[:level - 1] + [m.group(2)]
            continue
        if para and re.fullmatch(r" {0,3}(=+|-+)\s*", line) and len(para) == 1:    # setext heading
            level = 1 if line.strip()[0] == "=" else 2
            heading = heading[:level - 1] + [para[0].strip()]
            para.clear()
            continue
        if not line.strip():
            flush()
            continue
        if not para:
            start = i
        para.append(line)
    flush()
    return Parsed("markdown", blocks)


def _text(path: Path) -> Parsed:
    blocks = []
    para: list[str] = []
    start = 0
    for i, line in enumerate(_read_text(path).splitlines() + [""], start=1):
        if line.strip():
            if not para:
                start = i
            para.append(line.rstrip())
        elif para:
            blocks.append(Block("\n".join(para), line=start))
            para = []
    return Parsed("text", blocks)


# -- HTML ------------------------------------------------------------------------------------
_SKIP = {"script", "style", "noscript", "template", "svg", "nav", "head", "iframe", "object"}
_BLOCK = {"p", "div", "li", "ul", "ol", "section", "article", "main", "header", "footer", "aside", "br",
          "table", "tr", "td", "th", "pre", "blockquote", "dd", "dt", "dl", "figcaption", "hr", "form"}
_VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "track", "wbr"}


class _HTMLBlocks(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.heading: list[str] = []
        self.text: list[str] = []
        self.skip = 0
        self.in_heading = 0
        self.heading_text: list[str] = []
        self.title: list[str] = []
        self.in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if tag in _SKIP and tag not in _VOID:
            self.skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.flush()
            self.in_heading = int(tag[1])
            self.heading_text = []
        elif tag in _BLOCK:
            self.flush()
        elif tag in ("td", "th"):
            self.text.append(" ")

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in _SKIP and tag not in _VOID:
            self.skip = max(0, self.skip - 1)
        elif re.fullmatch(r"h[1-6]", tag) and self.in_heading:
            text = " ".join("".join(self.heading_text).split())
            if text:
                self.heading = self.heading[:self.in_heading - 1] + [text]
            self.in_heading = 0
        elif tag in _BLOCK:
            self.flush()

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
        if self.skip:
            return
        (self.heading_text if self.in_heading else self.text).append(data)

    def flush(self):
        text = " ".join("".join(self.text).split())
        self.text = []
        if text:
            self.blocks.append(Block(text, tuple(self.heading)))


def _html(path: Path) -> Parsed:
    p = _HTMLBlocks()
    p.feed(_read_text(path))
    p.close()
    p.flush()
    return Parsed("html", p.blocks)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def supported(path: str | os.PathLike) -> bool:
    return kind_of(path) is not None
