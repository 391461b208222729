"""Build question -> answer training pairs for denselm from the FAQs that Debian's packages ship.

    cd /tmp/faq && apt-get download r-doc-html zsh-doc fetchmail sqlite3-doc git-doc lsof sed zlib1g-dev \
        valgrind beets-doc borgbackup-doc charliecloud-doc copyq-doc docutils-doc llvm-16-doc lmod-doc \
        mypy-doc numba-doc oar-doc pelican-doc pybind11-doc pylint-doc python-black-doc python-celery-doc \
        python-coverage-doc python-cryptography-doc python-dask-doc python-doit-doc python-future-doc \
        python-h5py-doc python-jinja2-doc python-jsonschema-doc python-ldap-doc python-psycopg2-doc \
        python-pygments-doc python-pymongo-doc python-requests-doc python-sqlobject-doc apt-listbugs delve \
        lxd snoopy termshark && for f in *.deb; do dpkg-deb -x "$f" root; done
    python scripts/build_faq_pairs.py --sources /tmp/faq/root   # or --sources / when the packages are installed
    python scripts/build_faq_pairs.py --sources /tmp/faq/root / # several roots: each FAQ from the first that has it
    python scripts/build_faq_pairs.py --no-teacher             # skip the all-MiniLM-L6-v2 scores

Why: both evaluation tasks of ``denselm demo`` (data/pyfaq, data/perlfaq) ask FAQ questions
("How do I ...?", "Why does ...?") of answer paragraphs, while the other training pairs are headings,
API entries and dictionary definitions. These FAQs are real questions with their authors' answers,
about 43 other programs and libraries, so they teach the question -> answer form without the
evaluation's domain (no Perl, nothing of the Python FAQ: the leak check below).

What it reads (one FAQ per source in SOURCES, under --sources): HTML: the R FAQ (``r-doc-html``,
texinfo HTML, numbered ``<h3>``/``<h4>`` headings), the Z shell FAQ (``zsh-doc``, six chapters,
numbered ``<h2>``), the fetchmail FAQ (``fetchmail``, ``<h2>`` headings ``G1. ...``), SQLite's FAQ
(``sqlite3-doc``, ``<p><b>(N) question</b></p>``); AsciiDoc: gitfaq(7) (``git-doc``, ``question?::``
entries); plain text with numbered questions: lsof's 00FAQ (``lsof``), the sed FAQ (``sed``), the zlib
FAQ (``zlib1g-dev``) and the Valgrind FAQ (``valgrind``); reStructuredText (the Sphinx sources that
documentation packages ship, ``html/_sources/faq.rst.txt``, and Docutils' FAQ.txt): question section
titles, or Lmod's definition-list questions, of 28 FAQs (BorgBackup, Celery, Dask, LLVM, mypy, ...);
Markdown: ATX or setext question headings of Black's, apt-listbugs', Delve's, LXD's, Snoopy's and
termshark's. Where a FAQ mixes plain section titles with its questions (R, zsh, lsof, sed, and every
reStructuredText and Markdown one), only entries whose text, without its number, ends with "?" or
starts with a question word (How, What, Why, Can, I ...) are kept; in the others every entry is a FAQ
item ("compress() returns Z_BUF_ERROR."). An answer is the text up to the next question or a heading
of the same or a higher level, as plain text (paragraphs joined by a blank line, ``<pre>``, listings,
``::`` literal blocks and fenced code kept verbatim, navigation panels, menus, page footers, labels,
comments and tables of contents left out, roles and links replaced by their text).

What it writes (under --out, default ``data/general/``), in denselm's training JSONL
(``{"query", "pos": [answer], "neg": [7 answers], "pos_scores", "neg_scores", "prompt"}``):
  faq.jsonl.gz       the kept pairs of the nine program FAQs (HTML, AsciiDoc and text: R ... Valgrind);
                     prompt "Given a question about <topic>, retrieve the passage that answers it" (the
                     demo's evaluation instruction with the FAQ's topic)
  faq-docs.jsonl.gz  the same for the 34 reStructuredText and Markdown FAQs of documentation packages:
                     a file of its own, so that a mix can weight it apart (the demo's default leaves it
                     out: docs/DEMO_RESULTS.md has the runs with it)
  faq-stats.json     per FAQ: entries found, kept, sampled, dropped (and why), leak examples; per file: lines.

How: answers under --min-answer-chars (40) are dropped; pairs whose question or answer leaks into an
evaluation set are dropped (build_wordnet_pairs' rule: more than half of the smaller text's word
8-grams shared with one query or document of the --eval folders); duplicate questions and answers
are dropped (normalized_text); a FAQ with more than --max-per-source (150) pairs keeps a seeded
sample (lsof's has 295). Hard negatives: BM25 over the same FAQ's answers, ranks 2-30, queried with
question + answer (7 a pair; a FAQ of n < 8 pairs gives n - 1), never an answer equal to the positive;
teacher scores from all-MiniLM-L6-v2. The gzip file is byte-for-byte reproducible.

Licences (written to data/LICENSE-faq.txt, each notice quoted from the FAQ itself or its package's
Debian copyright file): R FAQ GPL-2+, Z shell FAQ (P.W. Stephenson's permission notice), fetchmail
GPL-2+, SQLite public domain, gitfaq GPL-2, lsof Purdue (permissive, altered versions marked as
such: the notice file says what we changed), sed GPL-3+, zlib Zlib, Valgrind GPL-2+; the
reStructuredText and Markdown FAQs: the licence their package's copyright file gives for
``Files: *`` (BSD, MIT/Expat, Apache-2.0, GPL-2+/3+, AGPL-3, LGPL-2.1+, public domain, the Python
licence), quoted with its copyright holders. cryptsetup's FAQ (CC BY-SA 3.0, share-alike) is left out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_pyfaq_data import (  # noqa: E402  (the helpers shared with the Python-docs build)
    LeakDetector,
    Pair,
    mine_bm25_negatives,
    normalized_text,
    teacher_scores,
    write_jsonl,
)
from build_wordnet_pairs import DEFAULT_EVAL, _shown, load_eval_texts  # noqa: E402

logger = logging.getLogger("build_faq_pairs")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Given a question about {topic}, retrieve the passage that answers it"
QUESTION_WORDS = re.compile(
    r"^(?:how|what|why|when|where|which|who|whom|whose|can|could|does|do|did|is|are|was|were|should|"
    r"will|would|may|must|has|have|i|i'm|i've|my)\b", re.IGNORECASE)


@dataclass(frozen=True)
class FaqSource:
    """Where one FAQ lives and how its questions are marked."""

    name: str
    """short name, the ``source`` field prefix: ``r-faq``"""
    package: str
    """Debian package that ships it"""
    topic: str
    """what the prompt says the questions are about"""
    files: tuple[str, ...]
    """paths under --sources, read in this order (the first existing one of ``alternatives`` each)"""
    kind: str
    """html, asciidoc, text, rst (reStructuredText) or markdown"""
    question_tags: frozenset[str] = frozenset()
    """html: the block elements that can hold a question"""
    number: str = ""
    """regex of the question's number prefix, removed from the query (text: group 1 is the number)"""
    questions_only: bool = False
    """keep only headings that read as questions (the FAQ also has plain section titles: "Legalese")"""
    bold_only: bool = False
    """html: the question block's whole text is bold (SQLite's ``<p><b>(N) ...</b></p>``)"""
    copyright: str = ""
    """the package's Debian copyright file, for the licence notice"""
    output: str = "faq"
    """the file (stem) under --out its pairs go to: ``faq`` (the program FAQs of the demo's default mix) or
    ``faq-docs`` (the documentation packages' FAQs: kept apart, so that each can be weighted)"""
    notice: str = ""
    """where the licence notice is: 'debian' (the licence that the package's copyright file names for 'Files: *',
    or the whole file when it names none), 'debian:<License name>' (that licence of the copyright file), or
    'section:<heading regex>' (the blocks under that heading of the FAQ itself)"""


SOURCES = (
    FaqSource("r-faq", "r-doc-html", "R", ("usr/share/doc/r-doc-html/manual/R-FAQ.html",), "html",
              frozenset({"h3", "h4"}), r"\d+(?:\.\d+)+\s+", questions_only=True, copyright="usr/share/doc/r-doc-html/copyright",
              notice=r"section:1\.1 Legalese"),
    FaqSource("zsh-faq", "zsh-doc", "the Z shell (zsh)",
              tuple(f"usr/share/doc/zsh-common/html/FAQ0{i}.html" for i in range(1, 7)), "html",
              frozenset({"h2"}), r"\d+\.\d+:\s+", questions_only=True,
              notice=r"section:Copyright Information:"),
    FaqSource("fetchmail-faq", "fetchmail", "fetchmail", ("usr/share/doc/fetchmail/fetchmail-FAQ.html",), "html",
              frozenset({"h2"}), r"[A-Z]\d+\.\s+", copyright="usr/share/doc/fetchmail/copyright",
              notice="debian:GPL-2+ with OpenSSL exception"),
    FaqSource("sqlite-faq", "sqlite3-doc", "SQLite", ("usr/share/doc/sqlite3/faq.html",), "html",
              frozenset({"p"}), r"\(\d+\)\s+", bold_only=True, copyright="usr/share/doc/sqlite3-doc/copyright",
              notice="debian:public-domain"),
    FaqSource("gitfaq", "git-doc", "Git", ("usr/share/doc/git-doc/gitfaq.txt",), "asciidoc",
              copyright="usr/share/doc/git-doc/copyright", notice="debian:GPL-2"),
    # plain-text FAQs: a question is a line starting at column 0 (zlib: 1-2 spaces) with its number
    FaqSource("lsof-faq", "lsof", "lsof", ("usr/share/doc/lsof/00FAQ.gz",), "text",
              number=r"(\d+(?:\.\d+)+)[ \t]+", questions_only=True,
              copyright="usr/share/doc/lsof/copyright", notice="debian:Purdue"),
    FaqSource("sed-faq", "sed", "sed", ("usr/share/doc/sed/sedfaq.txt.gz",), "text",
              number=r"(\d+(?:\.\d+)+)\.[ \t]+", questions_only=True,
              copyright="usr/share/doc/sed/copyright", notice="debian:GPL-3+"),
    FaqSource("zlib-faq", "zlib1g-dev", "zlib", ("usr/share/doc/zlib1g-dev/FAQ.gz",), "text",
              number=r" {0,2}(\d+)\.[ \t]+", copyright="usr/share/doc/zlib1g-dev/copyright", notice="debian:Zlib"),
    FaqSource("valgrind-faq", "valgrind", "Valgrind", ("usr/share/doc/valgrind/FAQ.txt.gz",), "text",
              number=r"(\d+\.\d+)\.[ \t]+", copyright="usr/share/doc/valgrind/copyright",
              notice="debian:GPL-2.0+"),
)


def _doc_faq(name: str, package: str, topic: str, path: str, kind: str = "rst") -> FaqSource:
    """A reStructuredText or Markdown FAQ of a documentation package (most are Sphinx ``_sources``);
    only question titles are kept, the licence is the package's Debian copyright notice."""
    return FaqSource(name, package, topic, (path,), kind, questions_only=True, output="faq-docs",
                     copyright=f"usr/share/doc/{package}/copyright", notice="debian")


SPHINX = "html/_sources"
SOURCES += (
    _doc_faq("beets-faq", "beets-doc", "beets (a music library manager)", f"usr/share/doc/beets/{SPHINX}/faq.rst.txt"),
    _doc_faq("borg-faq", "borgbackup-doc", "BorgBackup", f"usr/share/doc/borgbackup/{SPHINX}/faq.rst.txt"),
    _doc_faq("charliecloud-faq", "charliecloud-doc", "Charliecloud (containers)",
             f"usr/share/doc/charliecloud/{SPHINX}/faq.rst.txt"),
    _doc_faq("copyq-faq", "copyq-doc", "CopyQ (a clipboard manager)", f"usr/share/doc/copyq/{SPHINX}/faq.rst.txt"),
    _doc_faq("docutils-faq", "docutils-doc", "Docutils and reStructuredText", "usr/share/doc/docutils-doc/FAQ.txt"),
    _doc_faq("llvm-faq", "llvm-16-doc", "LLVM", f"usr/share/doc/llvm-16-doc/{SPHINX}/FAQ.rst.txt"),
    _doc_faq("lmod-faq", "lmod-doc", "Lmod (environment modules)", f"usr/share/doc/lmod/{SPHINX}/040_FAQ.rst.txt"),
    _doc_faq("mypy-faq", "mypy-doc", "mypy", f"usr/share/doc/mypy/{SPHINX}/faq.rst.txt"),
    _doc_faq("numba-faq", "numba-doc", "Numba", f"usr/share/doc/numba-doc/{SPHINX}/user/faq.rst.txt"),
    FaqSource("oar-faq", "oar-doc", "OAR (a batch scheduler)",
              tuple(f"usr/share/doc/oar-doc/{SPHINX}/{part}/faq.rst.txt" for part in ("user", "admin")), "rst",
              questions_only=True, output="faq-docs", copyright="usr/share/doc/oar-doc/copyright", notice="debian"),
    _doc_faq("pelican-faq", "pelican-doc", "Pelican (a static site generator)",
             f"usr/share/doc/pelican/{SPHINX}/faq.rst.txt"),
    _doc_faq("pybind11-faq", "pybind11-doc", "pybind11", f"usr/share/doc/pybind11-doc/{SPHINX}/faq.rst.txt"),
    _doc_faq("pylint-faq", "pylint-doc", "Pylint", f"usr/share/doc/pylint/{SPHINX}/faq.rst.txt"),
    _doc_faq("black-faq", "python-black-doc", "Black (a code formatter)",
             f"usr/share/doc/python-black-doc/{SPHINX}/faq.md.txt", "markdown"),
    _doc_faq("celery-faq", "python-celery-doc", "Celery", f"usr/share/doc/python-celery-doc/{SPHINX}/faq.rst.txt"),
    _doc_faq("coverage-faq", "python-coverage-doc", "coverage.py",
             f"usr/share/doc/python-coverage-doc/{SPHINX}/faq.rst.txt"),
    _doc_faq("cryptography-faq", "python-cryptography-doc", "pyca/cryptography",
             f"usr/share/doc/python-cryptography-doc/{SPHINX}/faq.rst.txt"),
    _doc_faq("dask-faq", "python-dask-doc", "Dask", f"usr/share/doc/python-dask-doc/{SPHINX}/faq.rst.txt"),
    _doc_faq("doit-faq", "python-doit-doc", "doit (a task runner)", f"usr/share/doc/python-doit-doc/{SPHINX}/faq.rst.txt"),
    _doc_faq("future-faq", "python-future-doc", "python-future",
             f"usr/share/doc/python-future-doc/{SPHINX}/faq.rst.txt"),
    _doc_faq("h5py-faq", "python-h5py-doc", "h5py (HDF5)", f"usr/share/doc/python-h5py-doc/{SPHINX}/faq.rst.txt"),
    _doc_faq("jinja-faq", "python-jinja2-doc", "Jinja", f"usr/share/doc/python-jinja2-doc/{SPHINX}/faq.rst.txt"),
    _doc_faq("jsonschema-faq", "python-jsonschema-doc", "jsonschema",
             f"usr/share/doc/python-jsonschema-doc/{SPHINX}/faq.rst.txt"),
    _doc_faq("python-ldap-faq", "python-ldap-doc", "python-ldap", f"usr/share/doc/python-ldap-doc/{SPHINX}/faq.rst.txt"),
    _doc_faq("psycopg2-faq", "python-psycopg2-doc", "psycopg2 (PostgreSQL)",
             f"usr/share/doc/python-psycopg2-doc/{SPHINX}/faq.rst.txt"),
    _doc_faq("pygments-faq", "python-pygments-doc", "Pygments",
             f"usr/share/doc/python-pygments-doc/{SPHINX}/faq.rst.txt"),
    _doc_faq("pymongo-faq", "python-pymongo-doc", "PyMongo (MongoDB)",
             f"usr/share/doc/python-pymongo-doc/{SPHINX}/faq.rst.txt"),
    _doc_faq("requests-faq", "python-requests-doc", "Requests (HTTP)",
             f"usr/share/doc/python-requests-doc/{SPHINX}/community/faq.rst.txt"),
    _doc_faq("sqlobject-faq", "python-sqlobject-doc", "SQLObject", f"usr/share/doc/python-sqlobject-doc/{SPHINX}/FAQ.rst.txt"),
    _doc_faq("apt-listbugs-faq", "apt-listbugs", "apt-listbugs", "usr/share/doc/apt-listbugs/FAQ.md.gz", "markdown"),
    _doc_faq("delve-faq", "delve", "Delve (the Go debugger)", "usr/share/doc/delve/faq.md.gz", "markdown"),
    _doc_faq("lxd-faq", "lxd", "LXD (containers)", "usr/share/doc/lxd/faq.md.gz", "markdown"),
    _doc_faq("snoopy-faq", "snoopy", "Snoopy (command logging)", "usr/share/doc/snoopy/FAQ.md", "markdown"),
    _doc_faq("termshark-faq", "termshark", "termshark", "usr/share/doc/termshark/FAQ.md.gz", "markdown"),
)

# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

BLOCK_TAGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6", "p", "pre", "li", "dt", "dd", "blockquote",
                        "div", "table", "tr", "td", "th", "ul", "ol", "dl", "br", "hr", "title"})
HEADINGS = {f"h{i}": i for i in range(1, 7)}
SKIPPED_TAGS = frozenset({"script", "style", "head", "nav"})
SKIPPED_CLASSES = re.compile(r"\b(?:header|nav-panel|navigation|footnotes-segment|contents|section-toc|mini-toc|menu)\b")
PAGE_FOOTER = re.compile(r"^This page last modified on ")  # SQLite's pages end with it
VOID_TAGS = frozenset({"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr"})


@dataclass
class Block:
    """One block of text of an HTML page: the innermost block element it came from."""

    tag: str
    text: str
    bold: bool
    """every non-space character of the block was inside <b> or <strong>"""
    line: int


class BlockParser(HTMLParser):
    """Flattens a page into :class:`Block` s; whitespace collapsed except inside <pre>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.stack: list[str] = []  # open block tags
        self.skip_depth = 0  # >0 inside a skipped element (navigation, script ...)
        self.skip_stack: list[str] = []
        self.bold = 0
        self.pre = 0
        self.parts: list[tuple[str, bool]] = []
        self.start_line = 1

    def _flush(self):
        text = "".join(t for t, _ in self.parts)
        tag = self.stack[-1] if self.stack else "body"
        if not self.pre:
            text = re.sub(r"\s+", " ", text).strip()
        else:
            text = text.strip("\n").rstrip()
        if text.strip():
            bold = all(b for t, b in self.parts if t.strip())
            self.blocks.append(Block(tag, text, bold, self.start_line))
        self.parts = []
        self.start_line = self.getpos()[0]

    def handle_starttag(self, tag, attrs):
        if self.skip_depth:
            if tag not in VOID_TAGS:
                self.skip_depth += tag == self.skip_stack[-1]
            return
        cls = dict(attrs).get("class") or ""
        if tag in SKIPPED_TAGS or (tag in ("div", "table", "ul") and SKIPPED_CLASSES.search(cls)):
            self._flush()
            self.skip_depth, self.skip_stack = 1, [tag]
            return
        if tag in ("b", "strong"):
            self.bold += 1
        if tag in BLOCK_TAGS:
            self._flush()
            if tag == "hr":  # a rule ends an answer: fetchmail's page footer follows one
                self.blocks.append(Block("hr", "", False, self.getpos()[0]))
            if tag in VOID_TAGS:
                return
            if tag not in VOID_TAGS:
                self.stack.append(tag)
            self.pre += tag == "pre"

    def handle_endtag(self, tag):
        if self.skip_depth:
            if tag == self.skip_stack[-1]:
                self.skip_depth -= 1
                if not self.skip_depth:
                    self.skip_stack = []
                    self.start_line = self.getpos()[0]
            return
        if tag in ("b", "strong"):
            self.bold = max(0, self.bold - 1)
        if tag in BLOCK_TAGS and tag not in VOID_TAGS and tag in self.stack:
            self._flush()
            while self.stack:  # close any unclosed children (<p> inside <li> ...)
                open_tag = self.stack.pop()
                self.pre -= open_tag == "pre"
                if open_tag == tag:
                    break

    def handle_data(self, data):
        if not self.skip_depth:
            self.parts.append((data, self.bold > 0))


def html_blocks(text: str) -> list[Block]:
    parser = BlockParser()
    parser.feed(text)
    parser.close()
    parser._flush()
    return parser.blocks


def is_question(text: str) -> bool:
    return text.rstrip().endswith("?") or bool(QUESTION_WORDS.match(text))


def html_entries(blocks: list[Block], source: FaqSource, file: str) -> list[dict]:
    """``{"question", "answer", "source", "numbered"}`` for every question element of a page.

    An entry's answer runs to the next question element or to a heading of the same or a
    higher level (a chapter title ends the last answer of the chapter before it).
    """
    number = re.compile(source.number)
    entries: list[dict] = []
    current: dict | None = None
    for b in blocks:
        candidate = b.tag in source.question_tags and (b.bold or not source.bold_only) and number.match(b.text)
        ends = current is not None and (b.tag == "hr" or b.tag in HEADINGS and HEADINGS[b.tag] <= current["level"])
        if candidate or ends:
            current = None
        if candidate:
            question = number.sub("", b.text, count=1).strip()
            current = {"question": question, "answer": [], "source": f"{file}:{b.line}",
                       "level": HEADINGS.get(b.tag, 7)}
            entries.append(current)
        elif current is not None and b.text and not PAGE_FOOTER.match(b.text):
            current["answer"].append(b.text)
    return [{"question": e["question"], "answer": "\n\n".join(e["answer"]).strip(), "source": e["source"]}
            for e in entries]


ASCIIDOC_QUESTION = re.compile(r"^(?P<q>\S.*\S)::\s*$")
ASCIIDOC_RULE = re.compile(r"^(?:-{2,}|={2,}|~{2,})\s*$")
ASCIIDOC_ANCHOR = re.compile(r"^\[\[[^\]]*\]\]\s*$")
ASCIIDOC_LINK = re.compile(r"linkgit:([\w.-]+)\[(\d)\]")


def is_title(lines: list[str], i: int) -> bool:
    """Line ``i`` is a two-line AsciiDoc title: text underlined by a rule of (about) its length."""
    return (i + 1 < len(lines) and bool(lines[i].strip()) and bool(ASCIIDOC_RULE.match(lines[i + 1]))
            and abs(len(lines[i + 1].rstrip()) - len(lines[i].rstrip())) <= 2)


def asciidoc_entries(text: str, file: str) -> list[dict]:
    """gitfaq(7)'s ``question?::`` definition-list entries.

    A ``+`` line joins the next paragraph or ``----`` listing block to the entry (kept verbatim);
    a section title (a line underlined by a rule of its length) ends the entry.
    """
    lines = text.splitlines()
    entries: list[dict] = []
    current: dict | None = None
    listing: list[str] | None = None  # lines of the open ``----`` block
    i = 0
    while i < len(lines):
        line = lines[i]
        if listing is not None:
            if ASCIIDOC_RULE.match(line):
                if current is not None:
                    current["paragraphs"].append("\n".join(listing))
                listing = None
            else:
                listing.append(line)
        elif is_title(lines, i):
            current = None
            i += 1  # the underline
        elif ASCIIDOC_RULE.match(line):
            listing = []
        elif m := ASCIIDOC_QUESTION.match(line):
            current = {"question": m["q"], "paragraphs": [], "para": [], "source": f"{file}:{i + 1}"}
            entries.append(current)
        elif current is not None and not ASCIIDOC_ANCHOR.match(line):
            if line.strip() in ("", "+"):
                if current["para"]:
                    current["paragraphs"].append(" ".join(current["para"]))
                current["para"] = []
            else:
                current["para"].append(line.strip())
        i += 1
        if current is not None and (i == len(lines) or listing is not None and not listing) and current["para"]:
            current["paragraphs"].append(" ".join(current["para"]))  # a listing or the end closes the paragraph
            current["para"] = []
    out = []
    for e in entries:
        answer = ASCIIDOC_LINK.sub(r"\1(\2)", "\n\n".join(e["paragraphs"]))
        out.append({"question": e["question"].replace("`", ""), "answer": answer.replace("`", ""),
                    "source": e["source"]})
    return out


TEXT_RULE = re.compile(r"^\s*[-_*=~]{10,}\s*$")
CAPS_HEADING = re.compile(r"^\s*[A-Z][A-Z0-9 ,/&()-]*[A-Z]\s*$")


def text_entries(text: str, source: FaqSource, file: str) -> list[dict]:
    """Numbered questions of a plain-text FAQ (lsof, sed, zlib, Valgrind).

    A question starts at a line matching ``source.number`` and runs over following lines (at most
    three) until one ends with "?" or ":" or a blank line comes (Valgrind's answers follow their
    question without one). The answer is everything up to the next question or a rule line
    (``-----``), dedented, with runs of blank lines made one. A number seen twice (the table of
    contents, then the body) marks where the body starts: entries before it are the contents'
    (sed's contents are numbered differently from its body, so only position tells them apart).
    """
    number = re.compile(source.number)
    lines = text.splitlines()
    starts = [(i, m) for i, line in enumerate(lines) if (m := number.match(line))]
    seen: set[str] = set()
    for k, (i, m) in enumerate(starts):
        if m.group(1) in seen:  # the body repeats the table of contents from here on
            starts = starts[k:]
            break
        seen.add(m.group(1))
    all_starts = sorted(i for i, _ in starts) + [len(lines)]
    entries = []
    for (i, m), end in zip(starts, all_starts[1:]):
        question = [lines[i][m.end():].strip()]
        j = i + 1
        while (j < end and len(question) < 3 and lines[j].strip() and not question[-1].endswith(("?", ":"))
               and not TEXT_RULE.match(lines[j])):
            question.append(lines[j].strip())
            j += 1
        body = []
        for line in lines[j:end]:
            if TEXT_RULE.match(line):
                break
            body.append(line.rstrip())
        while body and (not body[-1].strip() or CAPS_HEADING.match(body[-1])):
            body.pop()  # blank lines, and a section title in capitals that belongs to what follows
        indents = [len(l) - len(l.lstrip()) for l in body if l.strip()]
        cut = min(indents, default=0)
        answer = re.sub(r"\n{3,}", "\n\n", "\n".join(l[cut:] for l in body)).strip("\n")
        entries.append({"question": " ".join(question), "answer": answer, "source": f"{file}:{i + 1}"})
    return entries


RST_ADORNMENT = re.compile(r"""^([=\-`:'"~^_*+#.])\1{2,}\s*$""")
RST_DIRECTIVE = re.compile(r"^\.\.\s+(?P<name>[\w:-]+)::(?:\s+(?P<rest>.*))?$")
RST_KEPT_DIRECTIVES = frozenset({"note", "warning", "tip", "important", "hint", "caution", "attention", "danger",
                                 "seealso", "versionadded", "versionchanged", "deprecated", "code", "code-block",
                                 "sourcecode", "admonition", "topic", "container", "rubric"})
RST_CODE_DIRECTIVES = frozenset({"code", "code-block", "sourcecode"})
RST_OPTION = re.compile(r"^\s+:[\w -]+:(?:\s.*)?$")
RST_INLINE = (
    (re.compile(r":[\w:+-]+:`~?(?P<t>[^`<]*?)\s*<[^>`]*>`"), r"\g<t>"),  # :ref:`text <target>`
    (re.compile(r":[\w:+-]+:`~(?:[\w.]*\.)?(?P<t>[^`]*)`"), r"\g<t>"),  # :func:`~os.path.join`: join, as Sphinx shows it
    (re.compile(r":[\w:+-]+:`(?P<t>[^`]*)`"), r"\g<t>"),  # :func:`os.path.join` (kept whole)
    (re.compile(r"`(?P<t>[^`<]+?)\s*<[^>`]*>`__?"), r"\g<t>"),  # `text <url>`_
    (re.compile(r"``(?P<t>[^`]+)``"), r"\g<t>"),
    (re.compile(r"`(?P<t>[^`]+)`__?"), r"\g<t>"),  # `named reference`_
    (re.compile(r"`(?P<t>[^`]+)`"), r"\g<t>"),
    (re.compile(r"\*\*(?P<t>[^*]+)\*\*"), r"\g<t>"),
    (re.compile(r"(?<![\w*])\*(?P<t>[^*\s][^*]*?)\*(?![\w*])"), r"\g<t>"),
    (re.compile(r"(?<=\w)__?(?=[\s.,;:!?)]|$)"), ""),  # Docutils_ (a reference name)
)
ANSWER_LABEL = re.compile(r"^(?:Answer|A):\s*")  # Celery's "**Answer:** ..." (the question is the title)
LIST_ITEM = re.compile(r"^\s*(?:[-*+•]|\d+[.)]|#\.)\s+")


def reflow(lines: list[str], inline=lambda text: text, literal_marker: str | None = None) -> str:
    """Paragraphs of wrapped lines joined into one line each; literal blocks and list items keep their lines.

    Literal (kept verbatim, dedented) are fenced blocks (Markdown ```), and blocks indented deeper than
    the running text: with ``literal_marker`` ("::", reStructuredText) only those after a paragraph
    ending with it (``Example::``, a code-block directive passes a bare "::"), otherwise (Markdown) any
    such block that is not a list item. List items start new lines. ``inline`` (markup to plain text)
    runs on each joined paragraph: a reference or a role can be wrapped over two lines.
    """
    paragraphs: list[str] = []
    block: list[str] = []
    base: int | None = None  # indent of the running text
    literal_next, literal_base = False, 0  # rst: the paragraph before ended with "::", and its indent

    def flush():
        nonlocal literal_next, literal_base
        if not block:
            return
        indent = min(len(l) - len(l.lstrip()) for l in block)
        deeper = base is not None and indent > base
        if literal_marker is None:
            literal = block[0].lstrip().startswith("```") or deeper and not LIST_ITEM.match(block[0])
        else:
            literal = literal_next and indent > literal_base
        if literal:
            if block[0].lstrip().startswith("```"):  # the fence lines themselves are markup
                block[:] = block[1:-1] if block[-1].strip() == "```" and len(block) > 1 else block[1:]
                indent = min((len(l) - len(l.lstrip()) for l in block if l.strip()), default=0)
            paragraphs.append("\n".join(l[indent:].rstrip() for l in block))
        else:
            out: list[str] = []
            for l in block:
                if LIST_ITEM.match(l) or not out:
                    out.append(l.strip())
                else:
                    out[-1] += " " + l.strip()
            text = inline("\n".join(out))
            if literal_marker is not None:
                # the indent of the line that says "::" (a definition term's body is indented under it)
                literal_next, literal_base = text.endswith(literal_marker), len(block[-1]) - len(block[-1].lstrip())
                if literal_next:  # "Example::" -> "Example:"; "text ::" and a bare "::" -> nothing
                    text = re.sub(r"\s+" + re.escape(literal_marker) + "$", "", text)
                    text = text[:-len(literal_marker)] + ":" if text.endswith(literal_marker) else text
            paragraphs.append(text)
        block.clear()

    fence = False
    for line in lines:
        if line.lstrip().startswith("```"):
            if not fence:
                flush()
            fence = not fence
            block.append(line)
            if not fence:
                flush()
            continue
        if fence:
            block.append(line)
        elif not line.strip():
            flush()
        else:
            indent = len(line) - len(line.lstrip())
            if not block and (base is None or not LIST_ITEM.match(line) and indent <= base):
                base = indent
            block.append(line)
    flush()
    return "\n\n".join(p for p in paragraphs if p.strip() and p.strip() != ":")


def rst_inline(text: str) -> str:
    for pattern, repl in RST_INLINE:
        text = pattern.sub(repl, text)
    return text


def rst_body(lines: list[str]) -> str:
    """reStructuredText source lines as plain text: labels, comments and directive options dropped,
    directive bodies (notes, code blocks) kept, roles and references replaced by their text."""
    out: list[str] = []
    skipping = False  # inside a dropped ``..`` block (a comment, a label list, a toctree)
    for line in lines:
        if skipping:
            if not line.strip() or line[:1].isspace():
                continue
            skipping = False
        if line.lstrip().startswith("..") and (line.strip() == ".." or line.lstrip()[2:3].isspace()):
            m = RST_DIRECTIVE.match(line.strip())
            if m is None or m["name"] not in RST_KEPT_DIRECTIVES:
                skipping = True  # a comment, a label or link target, a substitution, a toctree, an image ...
            elif m["name"] in RST_CODE_DIRECTIVES:
                out += ["", "::", ""]  # the indented block after it is code
            elif m["rest"]:
                out.append(m["rest"])  # ".. note:: text"
            continue
        if RST_OPTION.match(line) and out and not out[-1].strip():
            continue
        out.append(line)
    return ANSWER_LABEL.sub("", reflow(out, rst_inline, literal_marker="::"))


def heading_entry(entries: list[dict], current: dict | None, title: str, level: int, source: str) -> dict | None:
    """One heading of a reStructuredText or Markdown FAQ; returns the entry now open.

    A question opens an entry (appended to ``entries``); any other heading closes the open one when it
    is of the same or a higher level, and otherwise stays inside its answer as a line of text.
    """
    if is_question(title) or current is None or level <= current["level"]:
        current = None
    if is_question(title):
        current = {"question": title, "lines": [], "level": level, "source": source}
        entries.append(current)
    elif current is not None:
        current["lines"] += ["", title, ""]
    return current


def rst_entries(text: str, file: str) -> list[dict]:
    """Questions of a reStructuredText FAQ (Sphinx ``_sources/*.rst.txt``, Docutils' FAQ.txt).

    Two forms: a section title (a line underlined, and optionally overlined, by a punctuation
    rule at least its length); and a definition-list item (an unindented paragraph of at most three
    lines ending with "?", followed by an indented block: Lmod's FAQ). A title entry's answer runs to
    the next title of the same or a higher level (deeper non-question titles stay inside it, as text);
    a definition entry's answer is its indented block. Levels follow the order in which title styles
    first appear, as in reStructuredText itself.
    """
    lines = text.splitlines()
    styles: list[tuple[str, bool]] = []
    items: list[tuple] = []  # ("title", level, text, line) or ("line", text)
    i = 0
    while i < len(lines):
        line = lines[i]
        over = (RST_ADORNMENT.match(line) and i + 2 < len(lines) and lines[i + 1].strip()
                and RST_ADORNMENT.match(lines[i + 2]) and lines[i + 2][0] == line[0])
        under = (line.strip() and not line[0].isspace() and not RST_ADORNMENT.match(line) and i + 1 < len(lines)
                 and RST_ADORNMENT.match(lines[i + 1]) and len(lines[i + 1].rstrip()) >= len(line.rstrip()) - 1
                 and (i == 0 or not lines[i - 1].strip()))
        if over or under:
            style = (lines[i + 2 if over else i + 1][0], bool(over))
            if style not in styles:
                styles.append(style)
            title = lines[i + 1 if over else i].strip()
            items.append(("title", styles.index(style), rst_inline(title), i + (2 if over else 1)))
            i += 3 if over else 2
            continue
        items.append(("line", line, i + 1))
        i += 1

    entries: list[dict] = []
    current: dict | None = None
    k = 0
    while k < len(items):
        item = items[k]
        if item[0] == "title":
            _, level, title, lineno = item
            current = heading_entry(entries, current, title, level, f"{file}:{lineno}")
            k += 1
            continue
        _, line, lineno = item
        # a definition-list question: unindented lines ending with "?", then an indented block
        if line.strip() and not line[0].isspace() and (k == 0 or items[k - 1][0] == "title" or not items[k - 1][1].strip()):
            para = []
            j = k
            while j < len(items) and items[j][0] == "line" and items[j][1].strip() and not items[j][1][0].isspace():
                para.append(items[j][1].strip())
                j += 1
            while j < len(items) and items[j][0] == "line" and not items[j][1].strip():
                j += 1
            indented = j < len(items) and items[j][0] == "line" and items[j][1][:1].isspace()
            if para and len(para) <= 3 and para[-1].endswith("?") and indented and not para[0].startswith(".."):
                body = []
                while j < len(items) and items[j][0] == "line" and (not items[j][1].strip() or items[j][1][:1].isspace()):
                    body.append(items[j][1])
                    j += 1
                entries.append({"question": rst_inline(" ".join(para)), "lines": body, "source": f"{file}:{lineno}"})
                k = j
                continue
        if current is not None:
            current["lines"].append(line)
        k += 1
    return [{"question": e["question"], "answer": rst_body(e["lines"]), "source": e["source"]} for e in entries]


MD_HEADING = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<text>.*?)\s*#*\s*$")
MD_INLINE = (
    (re.compile(r"<a\s[^>]*>\s*</a>"), ""),
    (re.compile(r"!?\[(?P<t>[^\]]*)\]\([^)]*\)"), r"\g<t>"),  # [text](url), images
    (re.compile(r"\[(?P<t>[^\]]*)\]\[[^\]]*\]"), r"\g<t>"),  # [text][ref]
    (re.compile(r"`(?P<t>[^`]+)`"), r"\g<t>"),
    (re.compile(r"\*\*(?P<t>[^*]+)\*\*"), r"\g<t>"),
    (re.compile(r"(?<![\w*])[*_](?P<t>[^*_\s][^*_]*?)[*_](?![\w*])"), r"\g<t>"),
    (re.compile(r"<[a-z][^>]*>|</[a-z]+>"), ""),
)
MD_DROPPED = re.compile(r"^```\{(?:contents|toctree)\}")


def md_inline(text: str) -> str:
    for pattern, repl in MD_INLINE:
        text = pattern.sub(repl, text)
    return text


def markdown_entries(text: str, file: str) -> list[dict]:
    """Questions of a Markdown FAQ (MyST ``_sources/*.md.txt`` too): ATX (``## ...``) and setext (a line over
    ``===``/``---``) headings; an answer runs to the next heading of the same or a higher level. Fenced blocks are kept verbatim (a ``#``
    line inside one is a shell comment, not a heading); MyST contents/toctree directives are dropped."""
    entries: list[dict] = []
    current: dict | None = None
    fence = dropping = False
    lines = text.splitlines()
    underline_at: set[int] = set()  # setext underlines (``Title`` over ``=====``)
    for i, line in enumerate(lines):
        lineno = i + 1
        if line.lstrip().startswith("```"):
            if not fence and MD_DROPPED.match(line.lstrip()):
                dropping = True
            fence = not fence
            if dropping:
                dropping = fence
                continue
        if dropping:
            continue
        m = None if fence else MD_HEADING.match(line)
        setext = (not fence and i + 1 < len(lines) and line.strip() and not line[0].isspace()
                  and re.fullmatch(r"=+\s*|-+\s*", lines[i + 1]) is not None and len(lines[i + 1].strip()) >= 3)
        if setext:
            underline_at.add(i + 1)
        if i in underline_at:
            continue
        if m or setext:
            level = len(m["hashes"]) if m else (1 if lines[i + 1].startswith("=") else 2)
            title = md_inline(m["text"] if m else line).strip()
            current = heading_entry(entries, current, title, level, f"{file}:{lineno}")
            continue
        if current is not None:
            current["lines"].append(line)
    return [{"question": e["question"], "answer": ANSWER_LABEL.sub("", reflow(e["lines"], md_inline)), "source": e["source"]}
            for e in entries]


def read_source(root: Path, source: FaqSource) -> tuple[list[dict], list[str]]:
    """(entries of every file of the source, the files read)."""
    entries, read = [], []
    for rel in source.files:
        path = root / rel
        if not path.is_file():
            continue
        read.append(rel)
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8", errors="replace")
        name = Path(rel).name
        if source.kind == "html":
            entries += html_entries(html_blocks(text), source, name)
        elif source.kind == "text":
            entries += text_entries(text, source, name)
        elif source.kind == "rst":
            entries += rst_entries(text, name)
        elif source.kind == "markdown":
            entries += markdown_entries(text, name)
        else:
            entries += asciidoc_entries(text, name)
    return entries, read


def filter_entries(entries: list[dict], source: FaqSource, detector: LeakDetector | None,
                   eval_texts: list[tuple[str, str, str]], min_chars: int, stats: dict) -> list[Pair]:
    """Questions only, long enough answers, no leaks, no duplicates; counts in ``stats``."""
    counts: Counter = Counter()
    leaks: list[dict] = []
    seen_q: set[str] = set()
    seen_a: set[str] = set()
    kept: list[Pair] = []
    for e in entries:
        if source.questions_only and not is_question(e["question"]):
            counts["not a question"] += 1
            continue
        if len(e["answer"]) < min_chars:
            counts[f"answer under {min_chars} chars"] += 1
            continue
        if detector is not None:
            overlap, index, field = max(
                (detector.overlap(text) + (field,) for field, text in (("query", e["question"]), ("passage", e["answer"]))),
                key=lambda t: t[0])
            if overlap > detector.threshold:
                name, doc_id, text = eval_texts[index]
                counts[f"leak into {name} (8-gram overlap > {detector.threshold})"] += 1
                leaks.append({"source": e["source"], "field": field, "eval": f"{name}:{doc_id}",
                              "eval_text": text[:200], "overlap": round(overlap, 3)})
                continue
        q, a = normalized_text(e["question"]), normalized_text(e["answer"])
        if q in seen_q or a in seen_a:
            counts["duplicate question" if q in seen_q else "duplicate answer"] += 1
            continue
        seen_q.add(q)
        seen_a.add(a)
        kept.append(Pair(source.name, e["question"], e["answer"], e["source"]))
    stats["dropped"] = dict(sorted(counts.items()))
    stats["leak_examples"] = leaks[:20]
    return kept


# ---------------------------------------------------------------------------------------------
# Licences
# ---------------------------------------------------------------------------------------------


def license_paragraph(copyright_text: str, name: str) -> str | None:
    """The stand-alone ``License: <name>`` paragraph (the licence text) of a Debian copyright file, if any."""
    for paragraph in re.split(r"\n\s*\n", copyright_text):
        if paragraph.strip().splitlines()[:1] == [f"License: {name}"]:
            return paragraph.strip()
    return None


def files_paragraph(copyright_text: str) -> str:
    """The ``Files: *`` paragraph (its copyright holders) of a machine-readable Debian copyright file."""
    paragraphs = re.split(r"\n\s*\n", copyright_text)
    found = next((p for p in paragraphs if p.startswith("Files: *\n")), None)
    if found is None:
        raise ValueError("no 'Files: *' paragraph")
    return found.strip()


def license_notice(root: Path, source: FaqSource) -> str:
    """The notice that allows redistribution, quoted from the FAQ itself or its package's copyright file."""
    if source.notice == "debian" or source.notice.startswith("debian:"):
        text = (root / source.copyright).read_text(encoding="utf-8")
        if source.notice == "debian":  # the licence named in the "Files: *" paragraph, or the whole file
            try:
                files = files_paragraph(text)
            except ValueError:
                return text.strip()
            named = re.search(r"^License: *(.+)$", files, re.MULTILINE)
            if named is None:
                return text.strip()
            name = named[1].strip()
        else:
            files, name = files_paragraph(text), source.notice.split(":", 1)[1]
        standalone = license_paragraph(text, name)
        return files + (f"\n\n{standalone}" if standalone else "")
    heading = re.compile(source.notice.split(":", 1)[1])
    for rel in source.files:
        if not (root / rel).is_file():
            continue
        blocks = html_blocks((root / rel).read_text(encoding="utf-8", errors="replace"))
        for i, b in enumerate(blocks):
            if b.tag in HEADINGS and heading.fullmatch(b.text):
                body = []
                for after in blocks[i + 1:]:
                    if after.tag in HEADINGS or after.tag == "hr":
                        break
                    body.append(after.text)
                return b.text + "\n\n" + "\n\n".join(body)
    raise ValueError(f"{source.name}: no heading {heading.pattern!r} in {source.files}")


def write_license(roots: dict[str, Path], path: Path, sources: list[FaqSource], read: dict[str, list[str]], args) -> None:
    parts = [f"""\
The text in data/general/faq.jsonl.gz (the program FAQs) and data/general/faq-docs.jsonl.gz (the FAQs of
documentation packages) is derived, by scripts/build_faq_pairs.py, from the FAQs below
(Debian bookworm packages). What we changed: we split each FAQ into its questions and answers,
removed question numbers, rendered the HTML, AsciiDoc, reStructuredText or Markdown as plain text
(navigation, labels and comments left out), left
out non-question headings, answers under {args.min_answer_chars} characters, duplicates and anything
overlapping our evaluation sets, kept a seeded sample of at most {args.max_per_source} pairs per FAQ, and added other answers of the same FAQ as BM25-mined negative
passages and all-MiniLM-L6-v2 similarity scores. Each FAQ's own notice follows, verbatim.
"""]
    for s in sources:
        parts.append(f"\n\n{s.name}: {', '.join(read[s.name])} (Debian package {s.package})\n"
                     + "-" * 72 + "\n\n" + license_notice(roots[s.name], s) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=Path, nargs="+", default=[Path("/")],
                    help="roots under which the packages are extracted (usr/share/doc/...), or /; each FAQ is "
                         "taken from the first root that has it")
    ap.add_argument("--max-per-source", type=int, default=150,
                    help="keep at most this many pairs of one FAQ (a seeded sample, in file order), so that no "
                         "single program dominates")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "general")
    ap.add_argument("--license", type=Path, default=ROOT / "data" / "LICENSE-faq.txt")
    ap.add_argument("--eval", type=Path, nargs="*", default=[ROOT / d for d in DEFAULT_EVAL],
                    help="BEIR folders whose queries and documents no pair may overlap (missing ones are skipped)")
    ap.add_argument("--min-answer-chars", type=int, default=40)
    ap.add_argument("--num-neg", type=int, default=7)
    ap.add_argument("--neg-ranks", type=int, nargs=2, default=(2, 30), metavar=("FIRST", "LAST"),
                    help="BM25 ranks (1-based, positive included) that negatives are taken from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", default="minilm", help="sentence-transformers folder, or 'minilm' (packaged)")
    ap.add_argument("--no-teacher", action="store_true", help="leave out pos_scores/neg_scores")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the teacher")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()

    eval_texts, used, missing = load_eval_texts(args.eval)
    detector = LeakDetector([t for _, _, t in eval_texts]) if eval_texts else None
    stats: dict = {"eval_sets": {"checked": used, "missing": missing, "texts": len(eval_texts)}, "sources": {}}
    if not args.no_teacher:
        import torch

        torch.set_num_threads(args.threads)
        from denselm.assets import minilm_dir

        teacher_dir = minilm_dir() if args.teacher == "minilm" else Path(args.teacher)
    rows: dict[str, list[dict]] = {}  # output stem -> rows, in SOURCES order
    found, read = [], {}
    roots: dict[str, Path] = {}
    for source in SOURCES:
        root = next((r for r in args.sources if any((r / f).is_file() for f in source.files)), args.sources[0])
        roots[source.name] = root
        entries, read[source.name] = read_source(root, source)
        sstats: dict = {"package": source.package, "files": read[source.name], "entries": len(entries)}
        stats["sources"][source.name] = sstats
        if not read[source.name]:
            logger.warning("%s: none of %s under %s: skipped", source.name, source.files, args.sources)
            continue
        found.append(source)
        pairs = filter_entries(entries, source, detector, eval_texts, args.min_answer_chars, sstats)
        sstats["kept"] = len(pairs)
        if len(pairs) > args.max_per_source:
            chosen = sorted(random.Random(f"{args.seed}:{source.name}").sample(range(len(pairs)), args.max_per_source))
            pairs = [pairs[k] for k in chosen]
        sstats["sampled"] = len(pairs)
        logger.info("%s: %d entries, %d kept, %d sampled (dropped: %s)", source.name, len(entries), sstats["kept"],
                    len(pairs), sstats["dropped"])
        if len(pairs) < 2:
            continue
        num_neg = min(args.num_neg, len(pairs) - 1)
        mining = [Pair(p.kind, f"{p.query} {p.passage}", p.passage, p.source) for p in pairs]
        negatives = mine_bm25_negatives(mining, num_neg, args.neg_ranks[0], args.neg_ranks[1], args.seed, sstats)
        scores = None if args.no_teacher else teacher_scores(teacher_dir, pairs, negatives)
        for k, (p, negs) in enumerate(zip(pairs, negatives)):
            row = {"query": p.query, "pos": [p.passage], "neg": negs}
            if scores is not None:
                row["pos_scores"], row["neg_scores"] = scores[0][k], scores[1][k]
            row["prompt"] = PROMPT.format(topic=source.topic)
            rows.setdefault(source.output, []).append(row)
    if not rows:
        logger.error("no FAQ found under %s (extract the packages listed in the docstring there)",
                     ", ".join(map(str, args.sources)))
        return 1
    write_license(roots, args.license, found, read, args)
    stats["files"] = {}
    for stem, output_rows in rows.items():
        path = args.out / f"{stem}.jsonl.gz"
        stats["files"][stem] = {"path": _shown(path), "lines": len(output_rows), "bytes": write_jsonl(path, output_rows)}
        logger.info("wrote %d pairs to %s", len(output_rows), path)
    stats["license"] = _shown(args.license)
    stats["teacher"] = None if args.no_teacher else args.teacher
    (args.out / "faq-stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    logger.info("done in %.0f s", time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
