"""Rebuild denselm's Python-documentation data from Debian's ``python3.11-doc`` reST sources.

    apt-get install python3.11-doc
    python scripts/build_pyfaq_data.py                       # everything (about 15 min on 1 CPU thread)
    python scripts/build_pyfaq_data.py --no-teacher          # skip the all-MiniLM-L6-v2 scores
    python scripts/build_pyfaq_data.py --mine-with-model runs/x/final   # also mine with a denselm model
    python scripts/build_pyfaq_data.py --mine-with-model runs/x/final --mine-only   # only that

Writes (under --out, default ``data/``):
  pyfaq/         BEIR: the FAQ questions (``faq/*.rst.txt`` headings ending in "?") against their
                 answers (the text under each heading); corpus = the answers.
  pyfaq-large/   the same queries; corpus = the answers plus every other documentation section.
  pytrain/       training JSONL from the rest of the documentation (never ``faq/``), one file
                 per kind of pair, each line ``{"query", "pos": [text], "neg": [7 texts],
                 "pos_scores", "neg_scores", "prompt"}``:
                   sections   "doc title: section heading" -> the section's own text
                   api        an API signature (``.. function:: sig`` etc.) -> its description
                   glossary   a glossary term -> its definition
                   questions  a heading outside faq/ that is a question -> the text under it
                 ``<kind>.jsonl.gz`` hold everything, ``small.jsonl.gz`` a seeded 2000-line sample
                 for CPU runs (all question and glossary pairs, sections and API entries evenly).
  pytrain/stats.json  what was kept and dropped at each step.

The derived text is the Python documentation's, under the PSF licence (data/LICENSE-PSF.txt).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
import re
import subprocess
import sys
import textwrap
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("build_pyfaq_data")

DEFAULT_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
FAQ_PROMPT = "Given a question about Python, retrieve the passage that answers it"
# Two honest instructions per kind of pair (one picked per pair, seeded): each says what the query is.
PROMPTS = {
    "sections": [
        "Given the title and heading of a section of the Python documentation, retrieve the section's text",
        "Given a topic from the Python documentation, retrieve the passage that covers it",
    ],
    "api": [
        "Given a Python API signature, retrieve its documentation",
        "Given a function, class, method or attribute from the Python documentation, retrieve the description of what it does",
    ],
    "glossary": [
        "Given a Python term, retrieve its definition",
        "Given a term from the Python glossary, retrieve the passage that explains it",
    ],
    "questions": [
        FAQ_PROMPT,
        "Given a question about Python, retrieve the documentation passage that answers it",
    ],
}
KINDS = tuple(PROMPTS)

# ---------------------------------------------------------------------------------------------
# reST: headings and sections
# ---------------------------------------------------------------------------------------------

# A section adornment: one punctuation character repeated (reST allows any; the docs use these).
ADORNMENT = re.compile(r"^([=\-~^\"#*+'`:_<>])\1{2,}\s*$")


@dataclass
class Section:
    """A heading and the text under it, up to the next heading of any level."""

    doc: str
    """source path under _sources, without .rst.txt: ``library/json``"""
    index: int
    """position of the section in its document (0 = the document title)"""
    heading: str
    """cleaned heading text"""
    level: int
    """0 for the document title, 1 for its sections, ..."""
    lines: list[str]
    """raw reST lines of the body"""
    line_no: int
    """1-based line of the heading in the source file"""
    labels: list[str] = field(default_factory=list)
    """``.. _label:`` targets placed just before the heading (for :ref: resolution)"""


def split_sections(text: str, doc: str) -> list[Section]:
    """Split one reST file at its headings (underlined, or over- and underlined, single-line titles).

    A heading needs a blank line (or the file start) before it; literal blocks
    and directive bodies are indented, so a heading-like pair of lines inside
    them is never taken. Underlines shorter than their title are accepted as
    Sphinx does (with a warning); two FAQ headings have one.
    """
    lines = text.expandtabs(8).split("\n")
    # (first line of the heading block, title line, line after the block, style)
    heads: list[tuple[int, int, int, tuple[str, str]]] = []
    i = 0
    while i < len(lines) - 1:
        prev_blank = i == 0 or not lines[i - 1].strip()
        m = ADORNMENT.match(lines[i])
        if (
            m
            and prev_blank
            and i + 2 < len(lines)
            and lines[i + 1].strip()
            and not ADORNMENT.match(lines[i + 1])
            and ADORNMENT.match(lines[i + 2])
            and lines[i + 2][0] == m.group(1)
        ):
            heads.append((i, i + 1, i + 3, ("over", m.group(1))))
            i += 3
            continue
        line = lines[i]
        if (
            prev_blank
            and line.strip()
            and not line[0].isspace()
            and not ADORNMENT.match(line)
            and not re.match(r"\.\.(\s|$)", line)  # a directive or comment, not a title
            and ADORNMENT.match(lines[i + 1])
        ):
            heads.append((i, i, i + 2, ("under", lines[i + 1][0])))
            i += 2
            continue
        i += 1
    styles: list[tuple[str, str]] = []
    sections = []
    for n, (start, title, body_start, style) in enumerate(heads):
        if style not in styles:
            styles.append(style)
        end = heads[n + 1][0] if n + 1 < len(heads) else len(lines)
        # labels right above this heading (after the previous section's text)
        labels = []
        j = start - 1
        while j >= 0 and (not lines[j].strip() or LABEL.match(lines[j])):
            if LABEL.match(lines[j]):
                labels.append(LABEL.match(lines[j]).group(1).lower())
            j -= 1
        sections.append(
            Section(
                doc=doc,
                index=n,
                heading=lines[title].strip(),
                level=styles.index(style),
                lines=lines[body_start:end],
                line_no=title + 1,
                labels=labels,
            )
        )
    return sections


# ---------------------------------------------------------------------------------------------
# reST -> readable text
# ---------------------------------------------------------------------------------------------

DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([A-Za-z][\w:-]*)::(?:\s+(.*))?$")
LABEL = re.compile(r"^\s*\.\.\s+_([^:]+):\s*(?:\S.*)?$")
FOOTNOTE = re.compile(r"^(\s*)\.\.\s+\[([^\]]+)\]\s*(.*)$")
OPTION = re.compile(r"^\s+:[\w-]+:(\s|$)")
LIST_MARKER = re.compile(r"^(?:[-*+]|#\.|\d+\.|\(?[a-z0-9]\))\s+")
TABLE_RULE = re.compile(r"^\s*[+|]?[-=+| ]*[-=][-=+| ]*$")

PY_API = {
    "function", "method", "class", "attribute", "data", "exception", "decorator", "decoratormethod",
    "classmethod", "staticmethod", "abstractmethod", "coroutinefunction", "coroutinemethod",
    "awaitablefunction", "awaitablemethod", "property",
}
OTHER_API = {
    "c:function", "c:type", "c:member", "c:macro", "c:var", "c:struct", "opcode", "cmdoption",
    "envvar", "pdbcommand", "describe", "object",
}
API = PY_API | OTHER_API
DROP = {
    "index", "toctree", "contents", "moduleauthor", "sectionauthor", "highlight", "tabularcolumns",
    "include", "literalinclude", "raw", "image", "figure", "testsetup", "testcleanup", "miscnews",
    "limited-api-list", "audit-event-table", "program", "module", "currentmodule", "default-role",
    "role", "sectnum", "meta",
}
CODE = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "productionlist", "parsed-literal"}
ADMONITIONS = {
    "note": "Note:", "warning": "Warning:", "important": "Important:", "caution": "Caution:",
    "tip": "Tip:", "hint": "Hint:", "attention": "Attention:", "danger": "Danger:", "error": "Error:",
    "seealso": "See also:", "impl-detail": "CPython implementation detail:",
}
RELEASE = "3.11.2"  # Debian python3.11-doc 3.11.2-6+deb12u8
SUBSTITUTIONS = {"version": "3.11", "release": RELEASE, "today": ""}
# Roles Sphinx renders with "()" appended when the target has no explicit title.
CALLABLE_ROLES = {"func", "meth", "c:func", "py:func", "py:meth"}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _version_text(name: str, arg: str) -> str:
    parts = arg.split(None, 1)
    version = parts[0] if parts else ""
    rest = parts[1] if len(parts) > 1 else ""
    if name == "versionadded":
        head = f"New in version {version}."
    elif name == "versionchanged":
        head = f"Changed in version {version}:"
    elif name == "deprecated":
        head = f"Deprecated since version {version}:"
    else:  # deprecated-removed: "3.4 3.13"
        removed = rest.split(None, 1)
        head = f"Deprecated since version {version}, will be removed in version {removed[0] if removed else '?'}:"
        rest = removed[1] if len(removed) > 1 else ""
    return f"{head} {rest}".strip()


def render_rst(lines: list[str], labels: dict[str, str] | None = None, drop_api_bodies: bool = False) -> str:
    """Readable plain text from reST lines: markup stripped, code and examples kept as text.

    Directives become what Sphinx would show (``.. note::`` -> "Note: ...",
    ``.. versionadded:: 3.2`` -> "New in version 3.2."), API directives become
    their signature line followed by the description, index/toctree/comments
    vanish, and inline roles become their text (``:func:`len``` -> ``len()``,
    ``:ref:`label``` -> the heading it points to when ``labels`` knows it).
    ``drop_api_bodies`` leaves nested API entries out entirely (used to
    describe a class without its methods).
    """
    out: list[tuple[str, int | None]] = []  # (line, literal block id or None)
    skip_above: int | None = None  # while set: drop blank lines and lines indented deeper than this
    literal_above: int | None = None  # while set: lines indented deeper are literal text
    pending_literal: int | None = None  # a paragraph at this indent ended with "::"
    literal_id = 0
    n = len(lines)
    i = 0
    while i < n:
        line = lines[i].rstrip()
        ind = _indent(line)
        blank = not line.strip()
        if skip_above is not None:
            if blank or ind > skip_above:
                i += 1
                continue
            skip_above = None
        if literal_above is not None:
            if blank or ind > literal_above:
                out.append((line, literal_id))
                i += 1
                continue
            literal_above = None
        if blank:
            out.append(("", None))
            i += 1
            continue
        if pending_literal is not None:
            keep = pending_literal
            pending_literal = None
            if ind > keep:
                literal_id += 1
                literal_above = keep
                continue  # re-read this line as the first literal line
        stripped = line.strip()
        m = DIRECTIVE.match(line)
        if m:
            name, arg = m.group(2), (m.group(3) or "").strip()
            j = i + 1
            if name in API:
                # more signatures may follow on continuation lines
                sigs = [arg]
                while j < n and lines[j].strip() and _indent(lines[j]) > ind and not OPTION.match(lines[j]):
                    sigs.append(lines[j].strip())
                    j += 1
            while j < n and lines[j].strip() and _indent(lines[j]) > ind and OPTION.match(lines[j]):
                j += 1  # directive options (:noindex:, :synopsis: ...)
            i = j
            lower = name.lower()
            if lower in DROP:
                skip_above = ind
            elif name in API:
                if drop_api_bodies:
                    skip_above = ind
                else:
                    out.extend((" " * ind + s, None) for s in sigs)
            elif lower in CODE:
                literal_id += 1
                literal_above = ind
            elif lower in ADMONITIONS:
                out.append((" " * ind + f"{ADMONITIONS[lower]} {arg}".rstrip(), None))
            elif lower in ("versionadded", "versionchanged", "deprecated", "deprecated-removed"):
                out.append((" " * ind + _version_text(lower, arg), None))
            elif lower == "availability":
                out.append((" " * ind + f"Availability: {arg}".rstrip(), None))
            elif lower == "audit-event":
                # Sphinx shows the directive's content when it has some, else this sentence
                body_end = next((k for k in range(i, n) if lines[k].strip() and _indent(lines[k]) <= ind), n)
                if not any(l.strip() for l in lines[i:body_end]):
                    parts = arg.split(None, 2)
                    event = parts[0] if parts else ""
                    args = f" with arguments {parts[1]}." if len(parts) > 1 else "."
                    out.append((" " * ind + f"Raises an auditing event {event}{args}", None))
            elif arg:  # rubric, topic, sidebar, table titles, unknown directives: keep the argument
                out.append((" " * ind + arg, None))
            continue
        fm = FOOTNOTE.match(line)
        if fm:
            out.append((" " * ind + fm.group(3), None))
            i += 1
            continue
        if re.match(r"\.\.(\s|$)", stripped):
            # comment, label target, substitution definition: drop it and its indented block
            skip_above = ind
            i += 1
            continue
        if stripped.startswith("|") and stripped.endswith("|") and len(stripped) > 1:
            # a grid-table row: keep the cell text; directives inside cells are not rendered
            row = re.sub(r"\.\.\s+[\w:-]+::\s*", "", stripped[1:-1].strip())
            if row.strip(" |"):
                out.append((" " * ind + row, None))
            i += 1
            continue
        if TABLE_RULE.match(line) and len(stripped) > 3:
            i += 1  # table borders carry no text
            continue
        if stripped.endswith("::"):
            # the literal block is indented relative to the paragraph's text, which in a list
            # item starts after the marker ("* Use getattr()::" -> text at column 2)
            marker = LIST_MARKER.match(stripped)
            pending_literal = ind + (len(marker.group(0)) if marker else 0)
            if stripped == "::":
                i += 1
                continue
            line = line[:-2].rstrip() if line[:-2].endswith(" ") else line[:-1]
        out.append((line, None))
        i += 1
    return _finish(out, labels or {})


def _finish(out: list[tuple[str, int | None]], labels: dict[str, str]) -> str:
    """Clean inline markup paragraph by paragraph, dedent literal blocks, squeeze blank lines."""
    result: list[str] = []
    para: list[str] = []

    def flush():
        if para:
            result.extend(l.strip() for l in clean_inline("\n".join(para), labels).split("\n"))
            para.clear()

    block: list[str] = []
    block_id = None

    def flush_block():
        nonlocal block_id
        if block:
            body = list(block)
            while body and not body[-1].strip():
                body.pop()
            width = min((_indent(l) for l in body if l.strip()), default=0)
            result.extend(l[width:] for l in body)
            result.append("")  # the text after a code block starts a new paragraph
            block.clear()
        block_id = None

    for line, lid in out:
        if lid is None:
            flush_block()
            if line.strip():
                para.append(line)
            else:
                flush()
                result.append("")
        else:
            flush()
            if block_id is not None and lid != block_id:
                flush_block()
            block_id = lid
            block.append(line)
    flush()
    flush_block()
    text = "\n".join(result)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


INLINE = re.compile(
    r"``(?P<lit>.+?)``(?!`)"
    r"|:(?P<role>(?:[a-z]+:)?[a-z]+):`(?P<rc>(?:[^`\\]|\\.)+?)`"
    r"|`(?P<link>[^`]+?)`__?"
    r"|`(?P<interp>[^`]+?)`"
    r"|\*\*(?P<strong>[^*]+?)\*\*"
    r"|(?<![\w*\\])\*(?P<em>[^\s*](?:[^*]*?[^\s*\\])?)\*(?![\w*])"
    r"|\s?\[(?:#[\w-]*|\d+)\]_"
    r"|\|(?P<subst>[\w -]+)\|(?!_)"
    r"|\\(?P<esc>.)",
    re.DOTALL,
)
TITLE_TARGET = re.compile(r"^(?P<title>.*?)\s*<(?P<target>[^<>]+)>$", re.DOTALL)


def _role_text(role: str, content: str, labels: dict[str, str]) -> str:
    content = content.replace("\\", "")
    tt = TITLE_TARGET.match(content)
    if tt and tt.group("title"):
        title = tt.group("title")
        if role in ("pep", "rfc"):
            return title
        return title
    target = content.lstrip("!")
    short = target.startswith("~")
    target = target.lstrip("~").lstrip(".")  # ".name": a name Sphinx resolves from the current scope
    if role == "pep":
        return f"PEP {target.split('#')[0]}"
    if role == "rfc":
        return f"RFC {target.split('#')[0]}"
    if role == "issue":
        return f"bpo-{target}"
    if role == "gh":
        return f"gh-{target}"
    if role in ("ref", "doc"):
        return labels.get(target.lower(), labels.get(target.strip("/").lower(), target.replace("-", " ")))
    if role == "abbr":
        return re.sub(r"\s*\(.*\)\s*$", "", target, flags=re.DOTALL)
    if short:
        target = target.rsplit(".", 1)[-1]
    if role in CALLABLE_ROLES and not target.endswith(")"):
        target += "()"
    return target


def clean_inline(text: str, labels: dict[str, str] | None = None) -> str:
    """Inline reST -> text: roles, literals, links, emphasis, footnote references, escapes."""
    labels = labels or {}

    def sub(m: re.Match) -> str:
        g = m.groupdict()
        if g["lit"] is not None:
            return g["lit"]
        if g["role"] is not None:
            return _role_text(g["role"], g["rc"], labels)
        if g["link"] is not None:
            tt = TITLE_TARGET.match(g["link"])
            return tt.group("title") if tt and tt.group("title") else g["link"]
        if g["interp"] is not None:
            return g["interp"]
        if g["strong"] is not None:
            return g["strong"]
        if g["em"] is not None:
            return g["em"]
        if g["subst"] is not None:
            return SUBSTITUTIONS.get(g["subst"], g["subst"])
        if g["esc"] is not None:
            return "" if g["esc"] == " " else g["esc"]
        return ""  # footnote reference

    return INLINE.sub(sub, text)


def clean_heading(text: str, labels: dict[str, str] | None = None) -> str:
    """A heading as Sphinx shows it: inline markup stripped, ``---`` as an em dash."""
    text = clean_inline(text.strip(), labels)
    return re.sub(r"\s+", " ", text.replace(" --- ", " \u2014 ")).strip()


# ---------------------------------------------------------------------------------------------
# Documents -> FAQ pairs, sections, API entries, glossary entries
# ---------------------------------------------------------------------------------------------


@dataclass
class Doc:
    path: str
    title: str
    sections: list[Section]


def load_docs(sources: Path) -> list[Doc]:
    """Every ``*.rst.txt`` under ``sources`` split into sections, sorted by path."""
    docs = []
    for file in sorted(sources.rglob("*.rst.txt")):
        rel = file.relative_to(sources).as_posix()[: -len(".rst.txt")]
        sections = split_sections(file.read_text(encoding="utf-8"), rel)
        title = sections[0].heading if sections else rel
        docs.append(Doc(rel, title, sections))
    if not docs:
        raise FileNotFoundError(f"{sources}: no *.rst.txt files (apt-get install python3.11-doc)")
    return docs


def label_titles(docs: list[Doc]) -> dict[str, str]:
    """``.. _label:`` and document paths -> the heading text they name (for :ref:/:doc: roles)."""
    labels: dict[str, str] = {}
    for doc in docs:
        if doc.sections:
            labels[doc.path.lower()] = clean_heading(doc.title)
        for s in doc.sections:
            for label in s.labels:
                labels[label] = clean_heading(s.heading)
    return labels


@dataclass
class Pair:
    """One training pair before filtering and mining."""

    kind: str
    """one of KINDS: sections, api, glossary, questions"""
    query: str
    passage: str
    source: str
    """doc path and line, for debugging: ``library/json.rst.txt:120``"""


def faq_pairs(docs: list[Doc], labels: dict[str, str], drop_pointers: bool = True) -> tuple[list[dict], list[dict]]:
    """(kept, dropped) FAQ entries ``{"id", "question", "answer", "source"}``.

    An entry is a heading ending in "?" under faq/ and the text up to the next
    heading. ``drop_pointers`` leaves out answers that only refer elsewhere
    ("See the next question.", "See the Unicode HOWTO."): no passage can
    answer those queries.
    """
    kept, dropped = [], []
    for doc in docs:
        if not doc.path.startswith("faq/"):
            continue
        n = 0
        for s in doc.sections:
            question = clean_heading(s.heading, labels)
            if not question.endswith("?"):
                continue
            n += 1
            answer = render_rst(s.lines, labels)
            entry = {
                "id": f"faq-{doc.path.split('/', 1)[1]}-{n}",
                "question": question,
                "answer": answer,
                "source": f"{doc.path}.rst.txt:{s.line_no}",
            }
            pointer = re.fullmatch(r"See (the )?[^.\n]{0,60}\.", answer.strip()) is not None
            (dropped if drop_pointers and pointer else kept).append(entry)
    return kept, dropped


def section_pairs(docs: list[Doc], labels: dict[str, str]) -> list[Pair]:
    """Each section outside faq/: ``"<doc title>: <heading>"`` -> its text (kind "sections"), or,
    when the heading is a real question, the question itself -> its text (kind "questions")."""
    pairs = []
    for doc in docs:
        if doc.path.startswith("faq/"):
            continue
        title = clean_heading(doc.title, labels)
        parents: dict[int, str] = {}
        for s in doc.sections:
            heading = clean_heading(s.heading, labels)
            parents[s.level] = heading
            parent = parents.get(s.level - 1, "")
            if heading.startswith("...") and parent.endswith("...?"):
                # "How do I...?" followed by "... choose a name for my project?"
                heading = f"{parent[:-4].rstrip()} {heading[3:].lstrip()}"
            text = render_rst(s.lines, labels)
            source = f"{doc.path}.rst.txt:{s.line_no}"
            # a real question: not a group heading ("How do I...?") nor a context-free "What Now?"
            if heading.endswith("?") and not heading.endswith("...?") and len(heading.split()) >= 3:
                pairs.append(Pair("questions", heading, text, source))
            else:
                query = title if s.level == 0 else f"{title}: {heading}"
                pairs.append(Pair("sections", query, text, source))
    return pairs


def api_pairs(docs: list[Doc], labels: dict[str, str]) -> list[Pair]:
    """API signature (qualified with its module and class) -> its description (nested entries left out)."""
    pairs = []
    for doc in docs:
        if doc.path.startswith("faq/"):
            continue
        lines = [l for s in doc.sections for l in s.lines]  # headings cannot sit inside directives
        module = ""
        program = ""
        classes: list[tuple[int, str]] = []  # (indent, qualified class name) of enclosing class directives
        for i, line in enumerate(lines):
            m = DIRECTIVE.match(line)
            if not m:
                continue
            ind, name, arg = len(m.group(1)), m.group(2), (m.group(3) or "").strip()
            if name in ("module", "currentmodule"):
                module = "" if arg == "None" else arg
                continue
            if name == "program":
                program = arg
                continue
            if name not in API:
                continue
            j = i + 1
            sigs = [arg]
            while j < len(lines) and lines[j].strip() and _indent(lines[j]) > ind and not OPTION.match(lines[j]):
                sigs.append(lines[j].strip())
                j += 1
            end = j
            while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > ind):
                end += 1
            body = textwrap.dedent("\n".join(lines[j:end])).split("\n")
            while classes and classes[-1][0] >= ind:
                classes.pop()
            enclosing = classes[-1][1] if classes else ""
            names = [_qualify(name, s, module, enclosing, program) for s in sigs if s]
            if name in ("class", "exception"):
                classes.append((ind, _qualify(name, sigs[0], module, enclosing, program).split("(")[0].split(" ")[-1]))
            description = render_rst(body, labels, drop_api_bodies=True)
            if names and description:
                pairs.append(Pair("api", "\n".join(names), description, f"{doc.path}.rst.txt:{lines[i].strip()[:40]}"))
    return pairs


def _qualify(kind: str, sig: str, module: str, enclosing: str, program: str) -> str:
    """``dumps(obj)`` in module json -> ``json.dumps(obj)``; methods get their class too."""
    sig = clean_inline(sig)
    if kind == "cmdoption":
        return f"{program} {sig}".strip()
    if kind not in PY_API:
        return sig
    prefix = ""
    if enclosing:
        prefix = enclosing + "."
    elif module and not sig.startswith(module + "."):
        prefix = module + "."
    if kind in ("decorator", "decoratormethod"):
        return "@" + prefix + sig
    return prefix + sig


def glossary_pairs(docs: list[Doc], labels: dict[str, str]) -> list[Pair]:
    """Each ``.. glossary::`` term (a line at the directive's body indent) -> its definition."""
    pairs = []
    for doc in docs:
        lines = [l for s in doc.sections for l in s.lines]
        for i, line in enumerate(lines):
            m = DIRECTIVE.match(line)
            if not m or m.group(2) != "glossary":
                continue
            base = len(m.group(1))
            body_end = next(
                (k for k in range(i + 1, len(lines)) if lines[k].strip() and _indent(lines[k]) <= base), len(lines)
            )
            term_indent = min(_indent(l) for l in lines[i + 1 : body_end] if l.strip() and not OPTION.match(l))
            k = i + 1
            while k < body_end:
                if lines[k].strip() and _indent(lines[k]) == term_indent and not lines[k].strip().startswith(".."):
                    terms = []
                    while k < body_end and lines[k].strip() and _indent(lines[k]) == term_indent:
                        terms.append(clean_inline(lines[k].strip(), labels))
                        k += 1
                    start = k
                    while k < body_end and (not lines[k].strip() or _indent(lines[k]) > term_indent):
                        k += 1
                    definition = render_rst(textwrap.dedent("\n".join(lines[start:k])).split("\n"), labels)
                    if definition:
                        pairs.append(Pair("glossary", ", ".join(terms), definition, f"{doc.path}.rst.txt:{start}"))
                else:
                    k += 1
    return pairs


def corpus_sections(docs: list[Doc], labels: dict[str, str], exclude: set[tuple[str, int]]) -> list[dict]:
    """Every non-empty section outside ``exclude`` as a BEIR document (title left empty, like the answers)."""
    out = []
    for doc in docs:
        for s in doc.sections:
            if (doc.path, s.line_no) in exclude:
                continue
            text = render_rst(s.lines, labels)
            if len(text) >= 20:
                out.append({"_id": f"doc-{doc.path}-{s.index}", "title": "", "text": text})
    return out


# ---------------------------------------------------------------------------------------------
# Filtering: truncation, duplicates, FAQ leakage
# ---------------------------------------------------------------------------------------------


def truncate(text: str, max_chars: int) -> str:
    """The first ``max_chars`` characters, cut back to the last whitespace."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()


def _norm_words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ngrams(text: str, n: int = 8) -> set[int]:
    """Hashed word n-grams of the lowercased text (the whole text when shorter than n words)."""
    words = _norm_words(text)
    if len(words) < n:
        return {hash(" ".join(words))} if words else set()
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


class LeakDetector:
    """Flags texts sharing more than ``threshold`` of their 8-grams with one FAQ answer.

    Overlap with answer a = |grams(text) & grams(a)| / min(|grams(text)|, |grams(a)|),
    so a passage that quotes an answer and an answer that quotes a passage are both caught.
    """

    def __init__(self, answers: list[str], n: int = 8, threshold: float = 0.5):
        self.n, self.threshold = n, threshold
        self.sizes = []
        self.index: dict[int, list[int]] = defaultdict(list)
        for a, text in enumerate(answers):
            grams = ngrams(text, n)
            self.sizes.append(len(grams))
            for g in grams:
                self.index[g].append(a)

    def overlap(self, text: str) -> tuple[float, int]:
        """(largest overlap with any answer, that answer's index or -1)."""
        grams = ngrams(text, self.n)
        if not grams:
            return 0.0, -1
        shared = Counter(a for g in grams for a in self.index.get(g, ()))
        best, best_a = 0.0, -1
        for a, count in shared.items():
            value = count / min(len(grams), self.sizes[a])
            if value > best:
                best, best_a = value, a
        return best, best_a

    def leaks(self, text: str) -> bool:
        return self.overlap(text)[0] > self.threshold


def filter_pairs(
    pairs: list[Pair],
    faq: list[dict],
    max_chars: int,
    min_chars: int,
    stats: dict,
) -> list[Pair]:
    """Truncate passages, drop short ones, FAQ leaks (queries and passages), then exact duplicates."""
    detector = LeakDetector([e["answer"] for e in faq])
    faq_questions = {" ".join(_norm_words(e["question"])) for e in faq}
    counts = Counter()
    kept: list[Pair] = []
    seen_queries: set[str] = set()
    seen_passages: set[str] = set()
    leak_examples = []
    for p in pairs:
        passage = truncate(p.passage, max_chars)
        query = p.query.strip()
        if len(passage) < min_chars or not query:
            counts[f"{p.kind}: passage under {min_chars} chars"] += 1
            continue
        if " ".join(_norm_words(query)) in faq_questions:
            counts[f"{p.kind}: query is a FAQ question"] += 1
            continue
        # check the untruncated text too: the kept start may be clean while the rest quotes an answer
        score, a = max(detector.overlap(passage), detector.overlap(p.passage))
        if score > detector.threshold:
            counts[f"{p.kind}: FAQ leak (8-gram overlap > {detector.threshold})"] += 1
            if len(leak_examples) < 20:
                leak_examples.append({"source": p.source, "faq": faq[a]["id"], "overlap": round(score, 3)})
            continue
        if query in seen_queries:
            counts[f"{p.kind}: duplicate query"] += 1
            continue
        if passage in seen_passages:
            counts[f"{p.kind}: duplicate passage"] += 1
            continue
        seen_queries.add(query)
        seen_passages.add(passage)
        kept.append(Pair(p.kind, query, passage, p.source))
    stats["dropped"] = dict(sorted(counts.items()))
    stats["leak_examples"] = leak_examples
    return kept


# ---------------------------------------------------------------------------------------------
# Hard negatives (BM25) and teacher scores (all-MiniLM-L6-v2)
# ---------------------------------------------------------------------------------------------


def mine_bm25_negatives(
    pairs: list[Pair], num_neg: int, first_rank: int, last_rank: int, seed: int, stats: dict
) -> list[list[str]]:
    """For each pair, ``num_neg`` passages of the pool ranked ``first_rank..last_rank`` (1-based) by BM25.

    The pool is every kept passage. Ranks 1 and 2 are skipped by default: the
    top of the list holds the positive and, often, a near-copy of it (an
    overload, the same function in another module), i.e. false negatives.
    Candidates equal to the positive up to case, punctuation and spacing
    (:func:`normalized_text`) are dropped: ``api.jsonl.gz`` once shipped a negative
    that was its positive plus a final period, which the collator's exact-text
    false-negative mask does not catch (``denselm doctor`` flagged it). When
    fewer than ``num_neg`` remain, the list is filled with random pool passages
    (counted in stats).
    """
    from denselm.baselines import bm25_run

    ids = [str(i) for i in range(len(pairs))]
    passages = [p.passage for p in pairs]
    keys = [normalized_text(t) for t in passages]
    run = bm25_run(ids, passages, ids, [p.query for p in pairs], k=last_rank)
    rng = random.Random(seed)
    negatives, filled, same_as_positive = [], 0, 0
    for i, p in enumerate(pairs):
        ranked = sorted(run[str(i)].items(), key=lambda kv: -kv[1])
        chosen = []
        for rank, (doc, _) in enumerate(ranked, start=1):
            if rank < first_rank or int(doc) == i:
                continue
            if keys[int(doc)] == keys[i]:
                same_as_positive += 1
                continue
            chosen.append(int(doc))
            if len(chosen) == num_neg:
                break
        while len(chosen) < num_neg:
            d = rng.randrange(len(pairs))
            if d != i and d not in chosen and keys[d] != keys[i]:
                chosen.append(d)
                filled += 1
        negatives.append([passages[d] for d in chosen])
    stats["bm25_negatives"] = {
        "num_neg": num_neg,
        "ranks": [first_rank, last_rank],
        "random_fill": filled,
        "dropped_same_as_positive": same_as_positive,
    }
    return negatives


def normalized_text(text: str) -> str:
    """``text`` casefolded, without punctuation (Unicode category P*) or whitespace: the key two
    passages must share to count as the same text (so "x is a string" == "X is a string.")."""
    return "".join(c for c in text.casefold() if not (c.isspace() or unicodedata.category(c).startswith("P")))


def teacher_scores(model_dir: Path, pairs: list[Pair], negatives: list[list[str]], batch_size: int = 64):
    """Raw cosine similarities (query, passage) from all-MiniLM-L6-v2: (pos_scores, neg_scores) per pair."""
    from denselm.baselines import load_sentence_transformer, st_encode

    model = load_sentence_transformer(model_dir)
    pool = sorted({p.passage for p in pairs} | {n for negs in negatives for n in negs})
    row = {text: k for k, text in enumerate(pool)}
    logger.info("teacher: encoding %d passages and %d queries", len(pool), len(pairs))
    passages = st_encode(model, pool, batch_size)
    queries = st_encode(model, [p.query for p in pairs], batch_size)
    pos, neg = [], []
    for q, p, negs in zip(queries, pairs, negatives):
        pos.append([round(float(q @ passages[row[p.passage]]), 4)])
        neg.append([round(float(q @ passages[row[t]]), 4) for t in negs])
    return pos, neg


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows) -> int:
    """Write rows as JSON lines (gzip when the name ends in .gz, with a fixed mtime: reproducible bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(filename=path.stem, fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path.stat().st_size


def write_beir(folder: Path, faq: list[dict], corpus: list[dict], gzip_over: int) -> dict:
    """queries.jsonl, corpus.jsonl (gzipped when over ``gzip_over`` bytes) and qrels/test.tsv."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "queries.jsonl", ({"_id": e["id"] + "-q", "text": e["question"]} for e in faq))
    size = len("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in corpus).encode())
    name = "corpus.jsonl.gz" if size > gzip_over else "corpus.jsonl"
    for stale in ("corpus.jsonl", "corpus.jsonl.gz"):
        if stale != name:
            (folder / stale).unlink(missing_ok=True)
    written = write_jsonl(folder / name, corpus)
    (folder / "qrels").mkdir(exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + [f"{e['id']}-q\t{e['id']}-a\t1" for e in faq]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return {"queries": len(faq), "docs": len(corpus), "corpus_file": name, "corpus_bytes": written, "corpus_text_bytes": size}


def write_license(sources: Path, path: Path, max_chars: int) -> None:
    """data/LICENSE-PSF.txt: copyright, what we changed (clause 3 asks for it), and both licences verbatim."""
    text = (sources / "license.rst.txt").read_text(encoding="utf-8")
    sections = {s.heading.replace("|release|", RELEASE): s for s in split_sections(text, "license")}

    def verbatim(heading: str) -> str:
        lines = sections[heading].lines
        start = next(i for i, l in enumerate(lines) if l.strip() == ".. parsed-literal::") + 1
        body = []
        for l in lines[start:]:
            if l.strip() and not l.startswith(" "):
                break
            body.append(l)
        return textwrap.dedent("\n".join(body)).strip().replace("|release|", RELEASE)

    copyright_line = next(
        l.strip() for l in (sources / "copyright.rst.txt").read_text(encoding="utf-8").splitlines() if "Python Software Foundation" in l
    )
    notice = f"""\
The text under data/pyfaq, data/pyfaq-large and data/pytrain is derived from the
Python {RELEASE} documentation (Debian package python3.11-doc, reST sources in
/usr/share/doc/python3.11/html/_sources), by scripts/build_pyfaq_data.py.

{copyright_line}

Summary of changes (PSF License Agreement, clause 3): the documentation sources were
split at their headings; reStructuredText markup was removed or replaced by the text
Sphinx displays (roles, directives, links, admonitions); training passages were cut to
their first {max_chars} characters; sections were paired with their headings, API signatures
with their descriptions, glossary terms with their definitions, FAQ questions with their
answers; BM25-mined negative passages and all-MiniLM-L6-v2 similarity scores were added.

Python software and documentation are licensed under the PSF License Agreement.
Examples, recipes, and other code in the documentation are dual licensed under the PSF
License Agreement and the Zero-Clause BSD license. Both follow, verbatim.


PSF LICENSE AGREEMENT FOR PYTHON {RELEASE}
{"-" * len(f"PSF LICENSE AGREEMENT FOR PYTHON {RELEASE}")}

{verbatim(f"PSF LICENSE AGREEMENT FOR PYTHON {RELEASE}")}


ZERO-CLAUSE BSD LICENSE FOR CODE IN THE PYTHON {RELEASE} DOCUMENTATION
{"-" * len(f"ZERO-CLAUSE BSD LICENSE FOR CODE IN THE PYTHON {RELEASE} DOCUMENTATION")}

{verbatim(f"ZERO-CLAUSE BSD LICENSE FOR CODE IN THE PYTHON {RELEASE} DOCUMENTATION")}
"""
    path.write_text(notice, encoding="utf-8")


def answers_corpus(faq: list[dict]) -> list[dict]:
    return [{"_id": e["id"] + "-a", "title": "", "text": e["answer"]} for e in faq]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=Path, default=DEFAULT_SOURCES, help="the _sources folder of python3.11-doc")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    ap.add_argument("--max-passage-chars", type=int, default=1000, help="training passages are cut here (at a space)")
    ap.add_argument("--min-passage-chars", type=int, default=40, help="shorter training passages are dropped")
    ap.add_argument("--num-neg", type=int, default=7)
    ap.add_argument("--neg-ranks", type=int, nargs=2, default=(3, 30), metavar=("FIRST", "LAST"),
                    help="BM25 ranks (1-based, positive included) that negatives are taken from")
    ap.add_argument("--small", type=int, default=2000, help="lines in pytrain/small.jsonl (a seeded sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gzip-over", type=int, default=25_000_000, help="gzip a BEIR corpus larger than this (bytes)")
    ap.add_argument("--keep-pointer-answers", action="store_true",
                    help="keep FAQ answers that only say 'See ...' (175 pairs instead of 173)")
    ap.add_argument("--teacher", default="minilm", help="sentence-transformers folder, or 'minilm' (packaged)")
    ap.add_argument("--no-teacher", action="store_true", help="leave out pos_scores/neg_scores")
    ap.add_argument("--mine-with-model", default=None, metavar="MODEL",
                    help="after writing, also mine negatives with this denselm model (`denselm mine`, then "
                    "`denselm score`) into pytrain/<kind>.model-mined.jsonl.gz")
    ap.add_argument("--mine-only", action="store_true",
                    help="with --mine-with-model: mine the existing pytrain files, rebuild nothing")
    ap.add_argument("--mine-kinds", nargs="+", default=list(KINDS), choices=list(KINDS),
                    help="with --mine-with-model: which pytrain files to mine (default all)")
    ap.add_argument("--mine-max-positive-ratio", type=float, default=None,
                    help="with --mine-with-model: drop candidates scoring above this fraction of the positive "
                    "(default: off; a model trained at temperature 0.02 scores its negatives within 5%% of the "
                    "positive, so 0.95 dropped 91%% of the candidates and left most lines unmined)")
    ap.add_argument("--mine-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                    help="with --mine-with-model: dtype the mining model runs in")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.mine_only:
        if not args.mine_with_model:
            ap.error("--mine-only needs --mine-with-model MODEL")
        _mine_with_model(args.mine_with_model, args.out / "pytrain", args)
        return 0
    t0 = time.perf_counter()
    docs = load_docs(args.sources)
    labels = label_titles(docs)
    stats: dict = {"sources": str(args.sources), "documents": len(docs)}

    args.out.mkdir(parents=True, exist_ok=True)
    write_license(args.sources, args.out / "LICENSE-PSF.txt", args.max_passage_chars)

    # -- evaluation sets
    faq, pointers = faq_pairs(docs, labels, drop_pointers=not args.keep_pointer_answers)
    stats["faq"] = {"pairs": len(faq), "dropped_pointer_answers": [e["source"] for e in pointers]}
    logger.info("FAQ: %d question-answer pairs (%d pointer-only answers left out)", len(faq), len(pointers))
    stats["pyfaq"] = write_beir(args.out / "pyfaq", faq, answers_corpus(faq), args.gzip_over)
    answer_sections = {(e["source"].split(".rst.txt:")[0], int(e["source"].rsplit(":", 1)[1])) for e in faq}
    distractors = corpus_sections(docs, labels, exclude=answer_sections)
    stats["pyfaq-large"] = write_beir(args.out / "pyfaq-large", faq, answers_corpus(faq) + distractors, args.gzip_over)
    logger.info("pyfaq-large: %d answers + %d distractor sections", len(faq), len(distractors))

    # -- training pairs
    raw = section_pairs(docs, labels) + api_pairs(docs, labels) + glossary_pairs(docs, labels)
    stats["raw_pairs"] = dict(Counter(p.kind for p in raw))
    # questions first so that a question heading wins over any other pair with the same passage
    raw.sort(key=lambda p: KINDS.index(p.kind) if p.kind == "questions" else len(KINDS))
    pairs = filter_pairs(raw, faq, args.max_passage_chars, args.min_passage_chars, stats)
    stats["kept_pairs"] = dict(Counter(p.kind for p in pairs))
    logger.info("training pairs: %s (dropped: %s)", stats["kept_pairs"], stats["dropped"])

    negatives = mine_bm25_negatives(pairs, args.num_neg, args.neg_ranks[0], args.neg_ranks[1], args.seed, stats)
    logger.info("BM25 negatives mined (%.0f s so far)", time.perf_counter() - t0)
    scores = None
    if not args.no_teacher:
        from denselm.assets import resolve

        scores = teacher_scores(resolve(args.teacher, kind="minilm"), pairs, negatives)
        logger.info("teacher scores done (%.0f s so far)", time.perf_counter() - t0)

    rng = random.Random(args.seed)
    rows_by_kind: dict[str, list[dict]] = defaultdict(list)
    for k, (p, negs) in enumerate(zip(pairs, negatives)):
        row = {"query": p.query, "pos": [p.passage], "neg": negs}
        if scores is not None:
            row["pos_scores"], row["neg_scores"] = scores[0][k], scores[1][k]
        row["prompt"] = rng.choice(PROMPTS[p.kind])
        rows_by_kind[p.kind].append(row)
    train_dir = args.out / "pytrain"
    stats["files"] = {}
    for kind in KINDS:
        path = train_dir / f"{kind}.jsonl.gz"
        stats["files"][path.name] = {"lines": len(rows_by_kind[kind]), "bytes": write_jsonl(path, rows_by_kind[kind])}
    # small.jsonl.gz, for CPU runs: every question and glossary pair, the rest drawn evenly
    # from sections and API entries (seeded); natural-language pairs are the closest to FAQ queries.
    small = rows_by_kind["questions"] + rows_by_kind["glossary"]
    room = max(0, args.small - len(small))
    small += rng.sample(rows_by_kind["sections"], min(room // 2, len(rows_by_kind["sections"])))
    small += rng.sample(rows_by_kind["api"], min(args.small - len(small), len(rows_by_kind["api"])))
    small = small[: args.small]
    rng.shuffle(small)
    stats["files"]["small.jsonl.gz"] = {"lines": len(small), "bytes": write_jsonl(train_dir / "small.jsonl.gz", small)}
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    (train_dir / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    logger.info("wrote %s in %.0f s", args.out, stats["seconds"])

    if args.mine_with_model:
        _mine_with_model(args.mine_with_model, train_dir, args)
    return 0


def _mine_with_model(model: str, train_dir: Path, args) -> None:
    """Hook for model-based mining: ``denselm mine`` then ``denselm score`` on each training file.

    Writes ``<kind>.model-mined.jsonl.gz`` next to the BM25 files (negatives from the model's
    ranking, same rank range, with false-negative control; teacher scores recomputed since
    the negatives changed). Skipped with a message where those commands are unavailable.
    """
    try:
        import denselm.mine  # noqa: F401
        import denselm.score  # noqa: F401
    except ImportError as err:
        logger.warning("--mine-with-model: %s; model-based mining skipped", err)
        return
    import tempfile

    denselm = [sys.executable, "-m", "denselm.cli"]
    first, last = args.neg_ranks
    stats_path = train_dir / "model-mined.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.mine_kinds:
            started = time.perf_counter()
            plain, mined, scored = (Path(tmp) / f"{kind}{suffix}.jsonl" for suffix in ("", ".mined", ".scored"))
            with gzip.open(train_dir / f"{kind}.jsonl.gz", "rb") as f:
                plain.write_bytes(f.read())
            # --range is 0-based [A, B): ranks FIRST..LAST (1-based) are FIRST-1..LAST-1
            subprocess.run([*denselm, "mine", "--model", model, "--input", str(plain), "--output", str(mined),
                            "--range", f"{first - 1}-{last}", "--num-negatives", str(args.num_neg),
                            "--seed", str(args.seed), "--dtype", args.mine_dtype]
                           + (["--max-positive-ratio", str(args.mine_max_positive_ratio)]
                              if args.mine_max_positive_ratio is not None else []), check=True)
            last_file = mined
            if not args.no_teacher:
                subprocess.run([*denselm, "score", "--teacher", args.teacher, "--input", str(mined),
                                "--output", str(scored)], check=True)
                last_file = scored
            rows = [json.loads(line) for line in last_file.read_text(encoding="utf-8").splitlines() if line.strip()]
            size = write_jsonl(train_dir / f"{kind}.model-mined.jsonl.gz", rows)
            stats[f"{kind}.model-mined.jsonl.gz"] = {
                "model": str(model), "lines": len(rows), "bytes": size, "num_neg": args.num_neg,
                "ranks": list(args.neg_ranks), "max_positive_ratio": args.mine_max_positive_ratio, "dtype": args.mine_dtype,
                "teacher_scores": not args.no_teacher, "seconds": round(time.perf_counter() - started, 1)}
            stats_path.write_text(json.dumps(stats, indent=2) + "\n")
            logger.info("%s: %d lines mined with %s in %.0f s", kind, len(rows), model, time.perf_counter() - started)


if __name__ == "__main__":
    sys.exit(main())
