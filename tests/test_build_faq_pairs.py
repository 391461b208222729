"""scripts/build_faq_pairs.py: FAQ parsing (texinfo/zsh/fetchmail/SQLite HTML, AsciiDoc, plain text,
reStructuredText, Markdown), filters, licences, output.

Runs on excerpts of the real files (tests/fixtures/faq, laid out as the packages install them), without
the teacher.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from data_helpers import ROOT, load_script

FIXTURE = ROOT / "tests" / "fixtures" / "faq"

f = load_script("build_faq_pairs")
SOURCES = {s.name: s for s in f.SOURCES}


def _entries(name: str) -> dict[str, dict]:
    entries, _ = f.read_source(FIXTURE, SOURCES[name])
    return {e["question"]: e for e in entries}


def _build(tmp_path: Path, name: str, *eval_dirs: str, sources: Path = FIXTURE) -> Path:
    out = tmp_path / name
    argv = ["--sources", str(sources), "--out", str(out), "--license", str(out / "LICENSE"), "--no-teacher",
            "--num-neg", "2", "--eval", *eval_dirs]
    assert f.main(argv) == 0
    return out


def _rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


# -- parsing ------------------------------------------------------------------------------------


def test_r_faq_numbered_headings_without_navigation_or_menus():
    e = _entries("r-faq")
    assert list(e) == [
        "Legalese", "Obtaining this document", "What is R?", "What machines does R run on?",
        "What is the current version of R?", "How can R be obtained?", "How can R be installed?",
        "How can R be installed (Unix-like)", "How can R be installed (Windows)",
    ]
    assert e["What machines does R run on?"]["answer"].startswith(
        "R is being developed for the Unix-like, Windows and Mac families of\noperating systems.".replace("\n", " "))
    assert e["What machines does R run on?"]["source"] == "R-FAQ.html:127"
    for entry in e.values():  # the "Next: ..., Previous: ..." panels and the section menus are left out
        assert "Next:" not in entry["answer"] and "Previous:" not in entry["answer"]
    # 2.5's own text is only its menu of 2.5.1-2.5.3: the answer stops at the first <h4>
    assert e["How can R be installed?"]["answer"] == ""
    assert e["How can R be installed (Unix-like)"]["answer"].startswith("If R is already installed")
    # paragraphs are joined by a blank line; inline markup is flattened
    assert "\n\nCopyright © 2021–2022 R Core Team\n\n" in e["Legalese"]["answer"]


def test_zsh_faq_h2_questions_across_chapters_with_inline_code():
    e = _entries("zsh-faq")
    q = 'Why does $var where var="foo bar" not do what I expect?'
    assert q in e and e[q]["source"] == "FAQ03.html:27"
    assert "In which startup file do I put...?" in e
    assert "Did zsh have problems in the year 2000?" in e
    last = e["When reporting a bug, how do I reduce my .zshrc into a minimal reproduction recipe?"]["answer"]
    assert "Restore your .zshrc from backup." in last
    assert "Thanks to zsh-list" not in last and "Stephenson" not in last  # the un-numbered h2 ends it


def test_fetchmail_footer_after_rule_is_not_an_answer():
    e = _entries("fetchmail-faq")
    assert list(e)[:2] == ["What is fetchmail and why should I bother?",
                           "Where do I find the latest FAQ and fetchmail sources?"]
    last = e['Linux logs "TCP(fetchmail:...): Application bug, race in MSG_PEEK."']["answer"]
    assert last.endswith("The message can safely be ignored.")
    assert "Back to" not in last and "Raymond" not in last and "$Date$" not in last


def test_sqlite_questions_are_whole_bold_paragraphs():
    e = _entries("sqlite-faq")
    assert list(e)[:2] == ["How do I create an AUTOINCREMENT field?", "What datatypes does SQLite support?"]
    assert e["What datatypes does SQLite support?"]["answer"] == (
        "SQLite uses dynamic typing. Content can be stored as INTEGER, REAL, TEXT, BLOB, or as NULL.")
    assert all("This page last modified" not in x["answer"] for x in e.values())
    page = "<html><body><p><b>(1) Is it bold?</b></p><p>(2) Not a question: plain text.</p><p>Yes it is.</p></body></html>"
    entries = f.html_entries(f.html_blocks(page), SOURCES["sqlite-faq"], "t.html")
    assert [(x["question"], x["answer"]) for x in entries] == [
        ("Is it bold?", "(2) Not a question: plain text.\n\nYes it is.")]


def test_pre_blocks_keep_their_lines():
    page = "<h2>1.1: How do I list?</h2><p>Run\n  this:</p><pre>\nls -l\n  | sort\n</pre><h2>Other</h2><p>x</p>"
    (entry,) = f.html_entries(f.html_blocks(page), SOURCES["zsh-faq"], "t.html")
    assert entry["answer"] == "Run this:\n\nls -l\n  | sort"


def test_gitfaq_asciidoc_listings_links_and_section_titles():
    e = _entries("gitfaq")
    assert list(e)[0] == "What should I put in user.name?"  # backticks removed
    editor = e["How do I configure a different editor?"]["answer"]
    assert "\n\nexport VISUAL=nano\n\nIf you want to configure an editor specifically for Git" in editor
    assert "see git-var(1) for details" in editor  # linkgit:git-var[1]
    assert "Credentials" not in editor.splitlines()  # the next section's title ends the answer
    cred = e["How do I read a password or token from an environment variable?"]["answer"]
    assert "$ git config credential.helper \\\n\t'!f() { echo username=author;" in cred  # listing kept verbatim
    assert e["What should I put in user.name?"]["source"] == "gitfaq.txt:23"


def test_text_faqs_skip_contents_wrap_questions_and_dedent():
    lsof = _entries("lsof-faq")
    assert lsof["Lsof -- what is it?"]["source"] == "00FAQ.gz:40"  # the body, not the contents' line 22
    assert lsof["Lsof -- what is it?"]["answer"].startswith("Lsof is a UNIX-specific tool.  Its name stands for LiSt\nOpen")
    assert lsof["General Concepts"]["answer"] == ""  # a section title: dropped later (not a question, no answer)
    sed = _entries("sed-faq")
    # the contents number this 4.33 and the body 4.32: only the body's entry is read
    assert "How do I handle shell quoting in sed?" not in sed
    assert sed["How do I handle Unix shell quoting in sed?"]["source"] == "sedfaq.txt.gz:105"
    # the capitals title of the next section is not part of this answer
    assert sed["How do I handle Unix shell quoting in sed?"]["answer"].endswith("sed 's/C:\\\\DOS/D:\\\\DOS/g' config.sys")
    zlib = _entries("zlib-faq")
    q = ("The match.asm code in contrib is under the GNU General Public License. Since it's part of zlib, "
         "doesn't that mean that all of zlib falls under the GNU GPL?")
    assert zlib[q]["answer"].startswith("No.  The files in contrib are not part of zlib.")
    assert zlib["compress() returns Z_BUF_ERROR."]["answer"].startswith("Make sure that before the call of compress()")
    valgrind = _entries("valgrind-faq")
    # no blank line between question and answer: the question ends at its "?"
    assert valgrind['How do you pronounce "Valgrind"?']["answer"].startswith('The "Val" as in the word "value".')
    make = valgrind["When building Valgrind, 'make' dies partway with an assertion failure, something like this:"]
    assert make["answer"].startswith("    % make: expand.c:489")  # code keeps its indent relative to the text
    assert all("-----" not in e["answer"] for e in valgrind.values())


def test_rst_section_titles_levels_labels_notes_and_literal_blocks():
    e = _entries("borg-faq")
    assert list(e) == [
        "What is the difference between a repo on an external hard drive vs. repo on a server?",
        "Can I backup from multiple servers into a single repository?",
        "I get an IntegrityError or similar - what now?", "How probable is it to get a hash collision problem?",
        "Isn't BorgBackup's AES-CTR crypto broken?"]
    assert e["I get an IntegrityError or similar - what now?"]["source"] == "faq.rst.txt:33"
    integrity = e["I get an IntegrityError or similar - what now?"]["answer"]
    # roles and references become their text, also when wrapped over two lines; labels are dropped
    assert "described in important_notes." in integrity and ":ref:" not in integrity and "_faq" not in integrity
    # a note's body and a rubric's title are text; "Checking hard drives" is a definition term, not a question
    assert "\n\nFinding defective hardware\n\nHardware diagnostics are operating system dependent" in integrity
    # "...in question::" then an indented block: the block is kept verbatim, the marker becomes ":"
    assert "the drive in question:\n\n# smartctl -a /dev/sdSomething\n\nThe Offline_Uncorrectable, " in integrity
    assert "*" not in integrity and "``" not in integrity
    assert integrity.endswith('re-run "check" with --repair enabled.')  # the next title ends it
    assert e["How probable is it to get a hash collision problem?"]["answer"].startswith(
        "If you noticed, there are some issues (170 (warning: hell) and 4884)")
    assert "called the Birthday Problem." in e["How probable is it to get a hash collision problem?"]["answer"]
    # a higher-level chapter title ("Security", #####) ends an answer and is not a question itself
    assert "Security" not in e["How probable is it to get a hash collision problem?"]["answer"]


def test_rst_definition_list_questions_and_answer_labels():
    lmod = _entries("lmod-faq")
    q = "What are the environment variables _ModuleTable001, _ModuleTable002, etc doing it in the environment?"
    assert list(lmod)[:3] == ["How does the module command work?", q, "How does one debug a modulefile?"]
    assert lmod[q]["source"] == "040_FAQ.rst.txt:32"  # a question wrapped over two lines, read whole
    # the indented block is the answer, dedented; its "::" sample keeps its own lines and indent
    assert lmod[q]["answer"].startswith("The module command remembers its state in the environment")
    assert "ModuleTable = {\n   mT = {\n     git = { ... }\n   }\n}" in lmod[q]["answer"]
    celery = _entries("celery-faq")
    # Celery writes "**Answer:** ..." under each question title: the label is markup, not the answer
    assert celery["Does Celery really consist of 50.000 lines of code?"]["answer"].startswith(
        "No, this and similarly large numbers have been reported")
    uses = celery["What kinds of things should I use Celery for?"]["answer"]
    assert uses.startswith("Queue everything and delight everyone is a good article")  # `text`_ reference
    assert "\n\n* Running something after the web request has finished.\n\n" in uses


def test_rst_inline_markup_and_comments():
    text = """\
How do I?
=========

.. _label:

.. comment that spans
   two lines

Use :func:`os.path.join`, ``code``, **bold**, *emphasis*, a `link <https://x.org>`_ and Name_.

.. code-block:: python

    x = 1  # **kept** as written

.. toctree::
   other
"""
    (entry,) = f.rst_entries(text, "t.rst")
    assert entry["answer"] == "Use os.path.join, code, bold, emphasis, a link and Name.\n\nx = 1  # **kept** as written"


def test_markdown_atx_setext_myst_and_fences():
    black = _entries("black-faq")
    assert list(black)[:2] == ["Why spaces? I prefer tabs", "Does Black have an API?"]
    assert black["Does Black have an API?"]["answer"] == (
        "Not yet. Black is fundamentally a command line tool. Many integrations are provided, but a Python "
        "interface is not one of them. A simple API is being planned though.")  # links and _emphasis_ flattened
    cells = black["Why is my Jupyter Notebook cell not formatted?"]["answer"]
    # fenced code keeps its lines (without the fence); list items keep theirs
    assert "- multiline magics, e.g.:\n\n%timeit f(1, \\\n        2, \\\n        3)\n\n- code which" in cells
    assert all("{contents}" not in x["answer"] and "```" not in x["answer"] for x in black.values())
    listbugs = _entries("apt-listbugs-faq")  # setext headings (a line over -----)
    assert list(listbugs) == ["How can I (temporarily) disable apt-listbugs?",
                              "How can I use apt-listbugs with apt-cacher/apt-cacher-ng proxies?"]
    assert "\n\nDPkg::Pre-Install-Pkgs {\"/usr/bin/apt-listbugs apt\";};\n\n" in listbugs[
        "How can I (temporarily) disable apt-listbugs?"]["answer"]
    text = "# FAQ\n\n## Why?\n\nBecause.\n\n```sh\n# not a heading\n```\n\n### Details\n\nMore.\n\n## Next section\n\nx\n"
    (entry,) = f.markdown_entries(text, "t.md")
    # a deeper non-question heading stays in the answer; a same-level one ends it
    assert entry["answer"] == "Because.\n\n# not a heading\n\nDetails\n\nMore."


def test_question_detection():
    for text in ("What is R?", "How do I do X", "I want to make fetchmail remove kept mail.", "Is it?",
                 "In which startup file do I put...?"):
        assert f.is_question(text), text
    for text in ("Legalese", "Citing R", "Similarities with bash", "Models"):
        assert not f.is_question(text), text


# -- the whole build ----------------------------------------------------------------------------


def test_build_writes_pairs_with_source_prompts_and_licences(tmp_path):
    out = _build(tmp_path, "a")
    program_rows, docs_rows = _rows(out / "faq.jsonl.gz"), _rows(out / "faq-docs.jsonl.gz")
    rows = program_rows + docs_rows
    stats = json.loads((out / "faq-stats.json").read_text())
    by_query = {r["query"]: r for r in rows}
    assert by_query["What is R?"]["prompt"] == "Given a question about R, retrieve the passage that answers it"
    assert by_query["What datatypes does SQLite support?"]["prompt"].endswith("about SQLite, retrieve the passage that answers it")
    assert "Legalese" not in by_query and "How can R be installed?" not in by_query
    r = stats["sources"]["r-faq"]
    assert r["entries"] == 9 and r["kept"] == 6
    assert r["dropped"] == {"answer under 40 chars": 1, "not a question": 2}
    assert stats["sources"]["fetchmail-faq"]["kept"] == 3
    # fetchmail keeps its statements ("Linux logs ..."): its entries are all FAQ items
    assert any(q.startswith("Linux logs") for q in by_query)
    assert stats["files"]["faq"]["lines"] == len(program_rows) and stats["files"]["faq-docs"]["lines"] == len(docs_rows)
    assert len(rows) == sum(s.get("kept", 0) for s in stats["sources"].values())
    # the nine program FAQs in faq.jsonl.gz; the documentation packages' (three reStructuredText, two Markdown
    # here) in faq-docs.jsonl.gz, so that a mix can weight them apart
    assert len({r["prompt"] for r in program_rows}) == 9
    assert {r["prompt"].split("about ")[1].split(", retrieve")[0] for r in docs_rows} == {
        "BorgBackup", "Lmod (environment modules)", "Celery", "Black (a code formatter)", "apt-listbugs"}
    prompts = {r["prompt"] for r in rows}
    answers_of = {}
    for row in rows:
        answers_of.setdefault(row["prompt"], set()).add(row["pos"][0])
    for row in rows:
        assert set(row) == {"query", "pos", "neg", "prompt"}
        assert len(row["neg"]) == min(2, len(answers_of[row["prompt"]]) - 1) and row["pos"][0] not in row["neg"]
        assert set(row["neg"]) <= answers_of[row["prompt"]]  # negatives come from the same FAQ
    licence = (out / "LICENSE").read_text()
    for notice in ("Kurt Hornik", "GNU General Public License", "P.W. Stephenson", "Permission is hereby granted",
                   "Matthias Andree", "GPL-2+ with OpenSSL exception", "put on the public domain",
                   "Linus Torvalds", "version 2 dated June, 1991", "Purdue Research Foundation",
                   "Altered versions must be plainly marked", "Jean-loup Gailly", "Julian Seward", "License: GPL-3+",
                   # "debian": the licence that the copyright file's "Files: *" names, with its text
                   "License: BSD-3-clause", "The Borg Collective", "License: MIT", "Robert McLay",
                   "License: BSD-2-clause", "Ask Solem", "Łukasz Langa", "Francesco Poli"):
        assert notice in licence, notice


def test_leaks_into_eval_sets_are_dropped(tmp_path):
    ev = tmp_path / "fakeeval"
    ev.mkdir()
    answer = _entries("sqlite-faq")["What datatypes does SQLite support?"]["answer"]
    (ev / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "Which types?"}) + "\n")
    (ev / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "", "text": f"Types. {answer}"}) + "\n")
    out = _build(tmp_path, "b", str(ev), str(tmp_path / "missing"))
    stats = json.loads((out / "faq-stats.json").read_text())
    assert stats["eval_sets"] == {"checked": [str(ev)], "missing": [str(tmp_path / "missing")], "texts": 2}
    sqlite = stats["sources"]["sqlite-faq"]
    assert sqlite["dropped"]["leak into fakeeval (8-gram overlap > 0.5)"] == 1
    (ex,) = sqlite["leak_examples"]
    assert ex["field"] == "passage" and ex["eval"] == "fakeeval:d1" and ex["source"] == "faq.html:177"
    assert "What datatypes does SQLite support?" not in {r["query"] for r in _rows(out / "faq.jsonl.gz")}


def test_output_is_reproducible(tmp_path):
    a, b = _build(tmp_path, "a"), _build(tmp_path, "b")
    for name in ("faq.jsonl.gz", "faq-docs.jsonl.gz"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    stats_a, stats_b = (json.loads((d / "faq-stats.json").read_text()) for d in (a, b))
    for stats in (stats_a, stats_b):  # the only difference: the output folder
        [entry.pop("path") for entry in stats["files"].values()], stats.pop("license")
    assert stats_a == stats_b


def test_missing_packages_are_skipped_and_none_is_an_error(tmp_path):
    only_git = tmp_path / "root"
    (only_git / "usr/share/doc/git-doc").mkdir(parents=True)
    for name in ("gitfaq.txt", "copyright"):
        (only_git / "usr/share/doc/git-doc" / name).write_bytes((FIXTURE / "usr/share/doc/git-doc" / name).read_bytes())
    out = _build(tmp_path, "c", sources=only_git)
    stats = json.loads((out / "faq-stats.json").read_text())
    assert stats["sources"]["r-faq"] == {"package": "r-doc-html", "files": [], "entries": 0}
    assert {r["prompt"] for r in _rows(out / "faq.jsonl.gz")} == {"Given a question about Git, retrieve the passage that answers it"}
    assert "R FAQ" not in (out / "LICENSE").read_text() and "Linus Torvalds" in (out / "LICENSE").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f.main(["--sources", str(empty), "--out", str(tmp_path / "d"), "--no-teacher", "--eval"]) == 1


@pytest.mark.parametrize("stem", ["faq", "faq-docs"])
def test_shipped_files(stem):
    path = ROOT / "data" / "general" / f"{stem}.jsonl.gz"
    stats = json.loads((ROOT / "data" / "general" / "faq-stats.json").read_text())
    rows = _rows(path)
    assert len(rows) == stats["files"][stem]["lines"] > 250
    assert stats["eval_sets"]["checked"] == ["data/pyfaq", "data/pyfaq-large", "data/perlfaq"]
    assert len({f.normalized_text(r["query"]) for r in rows}) == len(rows)
    sizes = Counter(r["prompt"] for r in rows)  # one prompt per FAQ; negatives come from the same FAQ
    output_of = {s.name: s.output for s in f.SOURCES}
    assert len(sizes) == sum(1 for name, s in stats["sources"].items() if s.get("sampled", 0) >= 2 and output_of[name] == stem)
    for r in rows:
        assert len(r["neg"]) == len(r["neg_scores"]) == min(7, sizes[r["prompt"]] - 1) and len(r["pos_scores"]) == 1
        assert len(r["pos"][0]) >= 40
    assert path.stat().st_size < 2_000_000
    assert "P.W. Stephenson" in (ROOT / "data" / "LICENSE-faq.txt").read_text()
