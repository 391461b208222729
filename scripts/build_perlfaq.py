"""Build the ``perlfaq`` BEIR retrieval task from the Perl FAQ (perlfaq1 .. perlfaq9) in Debian's ``perl-doc``.

Every ``=head2`` entry of ``perlfaq1.pod`` .. ``perlfaq9.pod`` is one question/answer pair: the
heading is the query, the text under it (up to the next ``=head1`` or ``=head2``) is its one
relevant document. POD is rendered to plain text here (``render_inline`` for formatting codes,
``render_blocks`` for paragraphs; no Pod::* or perl needed).

    apt-get download perl-doc && dpkg-deb -x perl-doc_*.deb /tmp/perl-doc   # no root needed
    python scripts/build_perlfaq.py --sources /tmp/perl-doc                  # writes data/perlfaq/
    python scripts/build_perlfaq.py --sources /                              # perl-doc installed

``--sources`` is the root of an extracted package (or ``/``); the pods are found at
``usr/share/perl/<version>/pod/perlfaq[1-9].pod``. The output is byte-for-byte reproducible
(fixed order, no timestamps or absolute paths). data/perlfaq was built from perl-doc
5.36.0-7+deb12u3 (Debian 12).

Writes (under ``--out``, default ``data/perlfaq``):
  corpus.jsonl       {"_id", "title": "", "text"}: the rendered answers (empty title, so the
                     question never leaks into its document)
  queries.jsonl      {"_id", "text"}: the questions, formatting codes removed
  qrels/test.tsv     header ``query-id<TAB>corpus-id<TAB>score``, one line per query (score 1)
                     ``perlfaqN-MMM-q`` -> ``perlfaqN-MMM-a``: file N, the M-th ``=head2`` of that
                     file, counted before anything is dropped (so ids follow the source). Query and
                     document ids differ (as in data/pyfaq), so ``--ignore-identical-ids`` is harmless
  stats.json         counts, what was dropped and why, the package version, the pods' sha256

Rendering: formatting codes are replaced by their text (``C<open>`` -> ``open``, ``E<lt>`` -> ``<``,
``L<text|target>`` -> ``text``, ``L<perlfunc/"open">`` -> ``"open" in perlfunc``, ``X<>``/``Z<>`` ->
nothing), an ordinary paragraph becomes one line, verbatim (indented) paragraphs are kept as code
lines (a run of them dedented together), ``=over``/``=item``/``=back`` markup is dropped but item
text kept, ``=for`` paragraphs and ``=begin``..``=end`` regions are dropped, and so are
``(contributed by ...)`` credit lines. Paragraphs are separated by one blank line.

Dropped pairs (listed in stats.json): answers under 40 characters, answers that only point
elsewhere (under 15 words and mostly a reference, "See perlfunc" style), and every later copy of a
question asked more than once (compared case- and whitespace-insensitively).

Licence: the perlfaq text is Copyright (c) 1997-2013 Tom Christiansen, Nathan Torkington and
other authors as noted, free under the same terms as Perl itself (GPL-1+ or the Artistic
License); its code examples are in the public domain. See data/LICENSE-perlfaq.txt.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.entities
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_pyfaq_data import write_beir  # noqa: E402  (the BEIR writer shared with the Python FAQ)

logger = logging.getLogger("build_perlfaq")

POD_GLOB = "usr/share/perl/*/pod"
FAQ_FILES = [f"perlfaq{n}.pod" for n in range(1, 10)]
CHANGELOG = "usr/share/doc/perl-doc/changelog.Debian.gz"
MIN_ANSWER_CHARS = 40
POINTER_MAX_WORDS = 15

# ---------------------------------------------------------------------------------------------
# formatting codes: B<> I<> C<> F<> S<> E<> L<> X<> Z<>, single and multi-bracket (C<< ... >>)
# ---------------------------------------------------------------------------------------------

# E<...> names POD defines beyond HTML's
POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}
_SPACES = re.compile(r"\s+")


@dataclass
class Code:
    """One formatting code: its letter and its content (strings and nested Codes)."""

    letter: str
    children: list = field(default_factory=list)


def parse_codes(s: str, i: int = 0, closer: str | None = None) -> tuple[list, int]:
    """Parse formatting codes in ``s`` from ``i`` until ``closer``.

    ``closer`` None: to the end; ``">"``: a single-bracket code (ends at the first ``>`` not
    closing a nested code); ``">>"``, ``">>>"``...: a multi-bracket code, ended by whitespace then
    that many ``>``. Returns (nodes, index after the closer); an unclosed code runs to the end.
    """
    nodes: list = []
    buf: list[str] = []
    n = len(s)
    end_multi = re.compile(r"\s+" + re.escape(closer)) if closer and len(closer) > 1 else None
    while i < n:
        c = s[i]
        if closer == ">" and c == ">":
            i += 1
            break
        if end_multi is not None and c.isspace():
            m = end_multi.match(s, i)
            if m:
                i = m.end()
                break
        if "A" <= c <= "Z" and i + 1 < n and s[i + 1] == "<":
            j = i + 1
            while j < n and s[j] == "<":
                j += 1
            brackets = j - i - 1
            if buf:
                nodes.append("".join(buf))
                buf = []
            if brackets > 1 and j < n and s[j].isspace():
                start = _SPACES.match(s, j).end()
                children, i = parse_codes(s, start, ">" * brackets)
            else:  # "C<<x>" is a single-bracket C<> holding "<x"
                children, i = parse_codes(s, i + 2, ">")
            nodes.append(Code(c, children))
            continue
        buf.append(c)
        i += 1
    if buf:
        nodes.append("".join(buf))
    return nodes, i


def _entity(name: str) -> str:
    name = name.strip()
    if name in POD_ENTITIES:
        return POD_ENTITIES[name]
    try:
        if name.lower().startswith("0x"):
            return chr(int(name[2:], 16))
        if name.startswith("0") and len(name) > 1:
            return chr(int(name[1:], 8))
        if name.isdigit():
            return chr(int(name))
    except ValueError:
        return ""
    if name in html.entities.name2codepoint:
        return chr(html.entities.name2codepoint[name])
    return f"E<{name}>"  # unknown: leave it visible rather than lose it


def _text(nodes: list) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node.letter == "E":
            out.append(_entity(_text(node.children)))
        elif node.letter in ("X", "Z"):
            continue
        elif node.letter == "L":
            out.append(_link(node.children))
        else:  # B I C F S, and unknown letters: their text
            out.append(_text(node.children))
    return "".join(out)


def _split_top(nodes: list, sep: str) -> tuple[list, list] | None:
    """Split a node list at the first ``sep`` in a top-level string (not inside a nested code)."""
    for k, node in enumerate(nodes):
        if isinstance(node, str) and sep in node:
            left, right = node.split(sep, 1)
            return nodes[:k] + ([left] if left else []), ([right] if right else []) + nodes[k + 1:]
    return None


def _unquote(s: str) -> str:
    s = s.strip()
    return s[1:-1] if len(s) >= 2 and s[0] == s[-1] == '"' else s


def _link(nodes: list) -> str:
    """``L<text|target>`` -> text; ``L<name/"sec">`` -> ``"sec" in name``; ``L</sec>`` / ``L<"sec">``
    -> ``"sec"``; ``L<name>`` and ``L<url>`` -> themselves."""
    parts = _split_top(nodes, "|")
    if parts is not None and _text(parts[0]).strip():
        return _text(parts[0]).strip()
    target_nodes = parts[1] if parts is not None else nodes
    target = _SPACES.sub(" ", _text(target_nodes)).strip()
    if re.match(r"[A-Za-z][\w+.-]*:[^:\s]", target):  # a URL (not Foo::Bar)
        return target
    split = _split_top(target_nodes, "/")
    if split is not None:
        name = _SPACES.sub(" ", _text(split[0])).strip()
        section = _unquote(_SPACES.sub(" ", _text(split[1])))
        return f'"{section}" in {name}' if name else f'"{section}"'
    return target  # L<name>, or L<"section"> (already quoted)


def render_inline(text: str) -> str:
    """POD text with formatting codes replaced by their plain text, whitespace runs collapsed."""
    return _SPACES.sub(" ", _text(parse_codes(text)[0])).strip()


# ---------------------------------------------------------------------------------------------
# paragraphs
# ---------------------------------------------------------------------------------------------

COMMAND = re.compile(r"^=([A-Za-z]\w*)\s*(.*)$", re.S)
CONTRIBUTED = re.compile(r"^[(\[][^()\[\]]*\bcontributed by\b[^()\[\]]*[)\]]\.?$", re.I)


def split_paragraphs(text: str) -> list[str]:
    """POD paragraphs: runs of lines separated by lines that are empty or whitespace-only."""
    paragraphs, cur = [], []
    for line in text.expandtabs(8).split("\n"):
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            paragraphs.append("\n".join(cur))
            cur = []
    if cur:
        paragraphs.append("\n".join(cur))
    return paragraphs


def _dedent(lines: list[str]) -> list[str]:
    indents = [len(line) - len(line.lstrip(" ")) for line in lines if line.strip()]
    cut = min(indents) if indents else 0
    return [line[cut:] for line in lines]


def render_blocks(paragraphs: list[str], counts: dict[str, int] | None = None) -> str:
    """Plain text from POD paragraphs (a body without its ``=head2``): see the module docstring.

    ``counts`` (optional) gets ``contributed_by_lines`` incremented per credit line removed.
    """
    blocks: list[str] = []
    code: list[str] = []  # the verbatim run being collected (paragraphs with "" between)
    skip_until: str | None = None  # inside =begin NAME: the NAME of the =end that closes it

    def flush_code():
        if code:
            while code and not code[-1].strip():
                code.pop()
            blocks.append("\n".join(_dedent(code)))
            code.clear()

    for para in paragraphs:
        cmd = COMMAND.match(para) if para.startswith("=") else None
        if skip_until is not None:
            if cmd and cmd.group(1) == "end" and cmd.group(2).split()[:1] == [skip_until]:
                skip_until = None
            continue
        if para[0].isspace():  # verbatim: no formatting codes, lines kept
            if code:
                code.append("")
            code.extend(para.split("\n"))
            continue
        flush_code()
        if cmd:
            name, arg = cmd.group(1), cmd.group(2)
            if name == "begin":
                skip_until = (arg.split() or [""])[0]
            elif name == "item":
                text = render_inline(re.sub(r"^\*(\s|$)", "", arg.strip()))
                if text:
                    blocks.append(text)
            elif name in ("head3", "head4", "head5", "head6", "head1", "head2"):
                text = render_inline(arg)
                if text:
                    blocks.append(text)
            # =over =back =for =pod =cut =encoding =end and unknown commands: dropped
            continue
        text = render_inline(para)
        if not text:  # e.g. a paragraph of X<> index entries
            continue
        if CONTRIBUTED.match(text):
            if counts is not None:
                counts["contributed_by_lines"] = counts.get("contributed_by_lines", 0) + 1
            continue
        blocks.append(text)
    flush_code()
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------
# entries
# ---------------------------------------------------------------------------------------------


@dataclass
class Entry:
    id: str
    """``perlfaq4-017``: the file and the 1-based ordinal of its =head2"""
    question: str
    answer: str
    line: int
    """1-based line of the =head2 in its pod"""


def decode_pod(raw: bytes) -> str:
    """Decode a pod: its ``=encoding`` if given, else UTF-8, else Latin-1 (as perlpodspec says)."""
    m = re.search(rb"^=encoding\s+(\S+)", raw, re.M)
    if m:
        return raw.decode(m.group(1).decode("ascii"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def extract_entries(text: str, stem: str, counts: dict[str, int] | None = None) -> list[Entry]:
    """Every =head2 of one pod as an Entry: the heading rendered, its body (to the next =head1 or
    =head2, whichever comes first) rendered by ``render_blocks``. Honours =cut/=pod: text outside
    POD (code) is ignored."""
    lines = text.replace("\r\n", "\n").split("\n")
    # keep only POD lines: from a command line to =cut (a pod file starts in POD here)
    pod_lines: list[tuple[int, str]] = []
    in_pod = True
    for no, line in enumerate(lines, 1):
        if line.startswith("=cut"):
            in_pod = False
            pod_lines.append((no, ""))
            continue
        if not in_pod and re.match(r"=[A-Za-z]", line):
            in_pod = True
        if in_pod:
            pod_lines.append((no, line))
    entries: list[Entry] = []
    ordinal = 0
    current: tuple[int, str, list[str]] | None = None  # (line, heading, body lines)
    prev_blank = True

    def close():
        if current is not None:
            line_no, heading, body = current
            entries.append(Entry(f"{stem}-{ordinal:03d}", render_inline(heading),
                                 render_blocks(split_paragraphs("\n".join(body)), counts), line_no))

    i = 0
    while i < len(pod_lines):
        no, line = pod_lines[i]
        head = re.match(r"=head([12])(\s|$)", line) if prev_blank else None
        if head:
            close()
            current = None
            # a command paragraph runs to the next blank line
            para = [line]
            while i + 1 < len(pod_lines) and pod_lines[i + 1][1].strip():
                i += 1
                para.append(pod_lines[i][1])
            if head.group(1) == "2":
                ordinal += 1
                current = (no, " ".join(para)[len("=head2"):].strip(), [])
            prev_blank = False
            i += 1
            continue
        if current is not None:
            current[2].append(line)
        prev_blank = not line.strip()
        i += 1
    close()
    return entries


def pointer_reason(answer: str) -> str | None:
    """Why ``answer`` is not worth a document, or None: under 40 characters ("short"), or under
    15 words that mostly point elsewhere ("pointer": starts with See/Read/Check, or most of its
    words are page, module or URL names such as perlfunc, Foo::Bar, "open" in perlop)."""
    if len(answer) < MIN_ANSWER_CHARS:
        return "short"
    words = answer.split()
    if len(words) >= POINTER_MAX_WORDS:
        return None
    if re.match(r"(?i)(see|read|check|look at|consult)\b", answer):
        return "pointer"
    refs = sum(1 for w in words if re.search(r"^\W*(perl\w+|\w+::\w+|https?://\S+|CPAN)\W*$", w))
    refs += 2 * len(re.findall(r'"[^"]+" in \w', answer))  # "sec" in page: the quote, "in", page
    return "pointer" if refs * 2 >= len(words) else None


def _norm_question(q: str) -> str:
    return _SPACES.sub(" ", q).strip().casefold()


# ---------------------------------------------------------------------------------------------
# sources and build
# ---------------------------------------------------------------------------------------------


def _version_key(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.-]", path.parent.name))


def find_pod_dir(sources: Path) -> Path:
    """``usr/share/perl/<version>/pod`` under ``sources`` holding perlfaq[1-9].pod (the highest
    version if several). A missing perlfaqN.pod is skipped with a warning (and listed in stats)."""
    dirs = [d for d in sources.glob(POD_GLOB) if any((d / f).is_file() for f in FAQ_FILES)]
    if not dirs:
        raise SystemExit(f"no {POD_GLOB}/perlfaq[1-9].pod under {sources}: extract perl-doc there "
                         "(apt-get download perl-doc && dpkg-deb -x perl-doc_*.deb DIR) and pass --sources DIR")
    dirs.sort(key=_version_key)
    if len(dirs) > 1:
        logger.warning("several perl versions under %s; using %s", sources, dirs[-1])
    return dirs[-1]


def debian_version(sources: Path) -> str | None:
    """The Debian package version from ``usr/share/doc/perl-doc/changelog.Debian.gz`` (first line
    ``perl (5.36.0-7+deb12u3) bookworm; ...``), or None when absent."""
    path = sources / CHANGELOG
    if not path.is_file():
        return None
    with gzip.open(path, "rt", encoding="utf-8") as f:
        m = re.match(r"\S+ \(([^)]+)\)", f.readline())
    return m.group(1) if m else None


def build(sources: Path, out: Path) -> dict:
    """Build the BEIR folder ``out`` from the pods under ``sources``; returns the stats written."""
    pod_dir = find_pod_dir(sources)
    counts: dict[str, int] = {"contributed_by_lines": 0}
    entries: list[Entry] = []
    files = {}
    faq_versions = set()
    per_file = {}
    missing = [name for name in FAQ_FILES if not (pod_dir / name).is_file()]
    if missing:
        logger.warning("%s lacks %s", pod_dir, ", ".join(missing))
    for name in FAQ_FILES:
        if name in missing:
            continue
        raw = (pod_dir / name).read_bytes()
        text = decode_pod(raw)
        m = re.search(r"^=head1 VERSION\s*\n\s*\nversion (\S+)", text, re.M)
        if m:
            faq_versions.add(m.group(1))
        found = extract_entries(text, name[: -len(".pod")], counts)
        per_file[name[: -len(".pod")]] = {"entries": len(found)}
        entries.extend(found)
        files[str((pod_dir / name).relative_to(sources))] = hashlib.sha256(raw).hexdigest()

    kept: list[Entry] = []
    dropped: list[dict] = []
    seen: dict[str, str] = {}
    for e in entries:
        reason = None
        if not e.question:
            reason = "empty question"
        elif _norm_question(e.question) in seen:
            reason = f"duplicate question of {seen[_norm_question(e.question)]}"
        else:
            reason = pointer_reason(e.answer)
        if reason:
            dropped.append({"id": e.id, "reason": reason, "question": e.question, "answer": e.answer})
            continue
        seen[_norm_question(e.question)] = e.id
        kept.append(e)
    kept.sort(key=lambda e: e.id)
    for stem in per_file:
        per_file[stem]["kept"] = sum(1 for e in kept if e.id.startswith(stem + "-"))

    by_text: dict[str, list[str]] = {}
    for e in kept:  # two questions with the very same answer text would make the task ambiguous
        by_text.setdefault(e.answer, []).append(e.id)
    same_answer = sorted(ids for ids in by_text.values() if len(ids) > 1)
    if same_answer:
        logger.warning("answers with identical text: %s", same_answer)

    # pyfaq's writer: the same ids (-q / -a), files and bytes; the corpus (about 300 KB) stays plain JSONL
    write_beir(out, [{"id": e.id, "question": e.question} for e in kept],
               [{"_id": e.id + "-a", "title": "", "text": e.answer} for e in kept], gzip_over=1 << 30)

    reasons: dict[str, int] = {}
    for d in dropped:
        key = "duplicate question" if d["reason"].startswith("duplicate") else d["reason"]
        reasons[key] = reasons.get(key, 0) + 1
    stats = {
        "source": {
            "package": "perl-doc",
            "debian_version": debian_version(sources),
            "perl_version": pod_dir.parent.name,
            "perlfaq_version": sorted(faq_versions),
            "files": files,
            "missing_files": missing,
        },
        "entries": len(entries),
        "queries": len(kept),
        "docs": len(kept),
        "qrels": len(kept),
        "per_file": per_file,
        "dropped": len(dropped),
        "dropped_by_reason": dict(sorted(reasons.items())),
        "dropped_entries": dropped,
        "contributed_by_lines_removed": counts["contributed_by_lines"],
        "identical_answers": same_answer,
        "answer_chars": _summary([len(e.answer) for e in kept]),
        "question_chars": _summary([len(e.question) for e in kept]),
        "rules": {"min_answer_chars": MIN_ANSWER_CHARS, "pointer_max_words": POINTER_MAX_WORDS},
    }
    _write(out / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats


def _summary(values: list[int]) -> dict:
    if not values:
        return {}
    s = sorted(values)
    return {"min": s[0], "median": s[len(s) // 2], "max": s[-1], "total": sum(s)}


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=Path, default=Path("/"),
                        help="root of an extracted perl-doc package, or / when it is installed (default /)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "perlfaq",
                        help="output BEIR folder (default: data/perlfaq in this repository)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    stats = build(args.sources, args.out)
    logger.info("%s: %d queries/documents from %d entries; dropped %d %s", args.out, stats["queries"],
                stats["entries"], stats["dropped"], stats["dropped_by_reason"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
