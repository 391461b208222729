"""scripts/build_perlfaq.py: POD rendering, pair extraction and drops, BEIR output, shipped data/perlfaq."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
from data_helpers import ROOT, load_script

from denselm.beir import load_beir

FIXTURE = ROOT / "tests" / "fixtures" / "perlfaq"
SHIPPED = ROOT / "data" / "perlfaq"


b = load_script("build_perlfaq")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------ formatting codes


@pytest.mark.parametrize(
    "pod, text",
    [
        ("B<bold> I<italic> C<code> F</etc/passwd> S<no break>", "bold italic code /etc/passwd no break"),
        ("C<< $a <=> $b >>", "$a <=> $b"),
        ("C<<< $h->{$a} >>>", "$h->{$a}"),
        ("C<<x>", "<x"),  # "<<" without a space is a single-bracket code
        ("E<lt>FHE<gt> E<sol> E<verbar> E<eacute> E<0xEF> E<0101> E<233>", "<FH> / | \u00e9 \u00ef A \u00e9"),
        ("C<E<lt>STDINE<gt>>", "<STDIN>"),
        ("X<index> Z<>after", "after"),
        ("L<perlfunc/\"open\">", '"open" in perlfunc'),
        ("L<perlfunc/open>", '"open" in perlfunc'),
        ("L<perlop/\"I/O Operators\">", '"I/O Operators" in perlop'),
        ("L</\"Local section\">", '"Local section"'),
        ("L<\"Quoted section\">", '"Quoted section"'),
        ("L<perlsec> L<Some::Module>", "perlsec Some::Module"),
        ("L<a link|http://example.org/x>", "a link"),
        ("L<http://example.org/x>", "http://example.org/x"),
        ("L<text|perlvar/\"$|\">", "text"),
        ("L<a E<verbar> b|perlvar>", "a | b"),
        ("L<< text B<bold>|perlre/C<(?PARNO)> >>", "text bold"),
        ("one\ntwo   three", "one two three"),
        ("C<unclosed", "unclosed"),
    ],
)
def test_render_inline(pod, text):
    assert b.render_inline(pod) == text


def test_render_blocks_lists_verbatim_and_dropped_markup():
    pod = """\
(contributed by Someone)

Intro with C<code>
on two lines.

    my $x = 1;
        indented();

    second();

=over 4

=item *

First.

=item * Inline item

=item Named

=back

=for comment dropped

=begin html

<p>dropped</p>

=head2 not a heading inside =begin

=end html

[Some of this answer was contributed by Kenneth Albanowski.]

Last."""
    counts = {}
    assert b.render_blocks(b.split_paragraphs(pod), counts) == (
        "Intro with code on two lines.\n\n"
        "my $x = 1;\n    indented();\n\nsecond();\n\n"
        "First.\n\nInline item\n\nNamed\n\nLast."
    )
    assert counts == {"contributed_by_lines": 2}


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("Yes, it is.", "short"),
        ('See "Formatting Numbers" in perlfaq4 and "sprintf" in perlfunc.', "pointer"),
        ("See the module String::Approx available from CPAN.", "pointer"),
        ("perlfunc, perlop, perlsyn, perlvar and perlsub cover this.", "pointer"),
        ("Get the Business::CreditCard module from CPAN, it checks numbers.", None),
        ("Use reverse() in scalar context, as documented in \"reverse\" in perlfunc.", None),
        ("See " + "word " * 20, None),  # 15 words or more is an answer
    ],
)
def test_pointer_reason(answer, reason):
    assert b.pointer_reason(answer) == reason


# ------------------------------------------------------------------ build from the fixture

ANSWER_1_001 = """\
Use three-argument open, always check the result, and read with /dev/stdin or any path; \
see "open" in perlfunc and perlopentut for more.

open my $fh, '<', $path
    or die "Can't open $path: $!";

while (my $line = <$fh>) {
    print $line;
}

Sort with $a <=> $b or $h->{$a} <=> $h->{$b}; read with <STDIN>; a / and a |; "no\\n break"; \
na\u00efve, caf\u00e9, A."""

ANSWER_1_002 = """\
The first bullet, with a link.

http://example.org/two

Named item

Text of the named item, see "Local section" and Some::Module.

Also text with | bar, "I/O Operators" in perlop, text bold and "Quoted section"."""

ANSWER_2_002 = """\
A paragraph before the code:

# a tab-indented line
print "hello\\n";"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("perlfaq") / "perlfaq"
    stats = b.build(FIXTURE, out)
    return out, stats


def test_fixture_queries_corpus_qrels(built):
    out, _ = built
    assert _jsonl(out / "queries.jsonl") == [
        {"_id": "perlfaq1-001-q", "text": "How do I read a file line by line with <$fh>?"},
        {"_id": "perlfaq1-002-q", "text": "Which lists and links does this FAQ use?"},
        {"_id": "perlfaq2-002-q", "text": "What is a verbatim block?"},  # a two-line =head2
    ]
    assert _jsonl(out / "corpus.jsonl") == [
        {"_id": "perlfaq1-001-a", "title": "", "text": ANSWER_1_001},
        {"_id": "perlfaq1-002-a", "title": "", "text": ANSWER_1_002},
        {"_id": "perlfaq2-002-a", "title": "", "text": ANSWER_2_002},
    ]
    assert (out / "qrels" / "test.tsv").read_text() == (
        "query-id\tcorpus-id\tscore\n"
        "perlfaq1-001-q\tperlfaq1-001-a\t1\n"
        "perlfaq1-002-q\tperlfaq1-002-a\t1\n"
        "perlfaq2-002-q\tperlfaq2-002-a\t1\n"
    )
    # nothing after the last =head2's =head1 (AUTHOR AND COPYRIGHT) leaks into an answer
    assert "Nobody" not in (out / "corpus.jsonl").read_text()
    assert "belongs to no answer" not in (out / "corpus.jsonl").read_text()


def test_fixture_drops_and_stats(built):
    out, stats = built
    assert json.loads((out / "stats.json").read_text()) == stats
    assert [(d["id"], d["reason"]) for d in stats["dropped_entries"]] == [
        ("perlfaq1-003", "pointer"),
        ("perlfaq1-004", "short"),
        ("perlfaq2-001", "duplicate question of perlfaq1-001"),
    ]
    assert stats["dropped_entries"][0]["answer"] == 'See "Formatting Numbers" in perlfaq4 and "sprintf" in perlfunc.'
    assert stats["dropped_by_reason"] == {"duplicate question": 1, "pointer": 1, "short": 1}
    assert (stats["entries"], stats["queries"], stats["docs"], stats["qrels"], stats["dropped"]) == (6, 3, 3, 3, 3)
    assert stats["per_file"] == {"perlfaq1": {"entries": 4, "kept": 2}, "perlfaq2": {"entries": 2, "kept": 1}}
    assert stats["contributed_by_lines_removed"] == 2
    src = stats["source"]
    assert src["perl_version"] == "5.36.0" and src["perlfaq_version"] == ["5.20210520"]
    assert src["debian_version"] is None  # the fixture has no changelog
    assert list(src["files"]) == ["usr/share/perl/5.36.0/pod/perlfaq1.pod", "usr/share/perl/5.36.0/pod/perlfaq2.pod"]
    assert src["missing_files"] == [f"perlfaq{n}.pod" for n in range(3, 10)]


def test_rebuild_is_byte_identical_and_version_from_changelog(built, tmp_path):
    out, _ = built
    sources = tmp_path / "src"
    shutil.copytree(FIXTURE, sources)
    changelog = sources / b.CHANGELOG
    changelog.parent.mkdir(parents=True)
    with gzip.GzipFile(changelog, "wb", mtime=0) as f:
        f.write(b"perl (5.36.0-7+deb12u3) bookworm; urgency=medium\n\n  * Something.\n")
    again = tmp_path / "again"
    stats = b.build(sources, again)
    assert stats["source"]["debian_version"] == "5.36.0-7+deb12u3"
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    # and a plain rebuild gives the very same stats.json too
    third = tmp_path / "third"
    b.build(FIXTURE, third)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "stats.json"):
        assert (third / name).read_bytes() == (out / name).read_bytes(), name


def test_fixture_loads_with_denselm_beir(built):
    out, _ = built
    data = load_beir(out, split="test")
    assert data.query_ids == ["perlfaq1-001-q", "perlfaq1-002-q", "perlfaq2-002-q"]
    assert data.corpus_ids == ["perlfaq1-001-a", "perlfaq1-002-a", "perlfaq2-002-a"]
    assert data.corpus_texts[1] == ANSWER_1_002  # empty title: the text alone
    assert data.qrels == {q: {q[:-1] + "a": 1} for q in data.query_ids}
    assert data.stats.num_unknown_doc_judgements == data.stats.num_queries_without_qrels == 0


def test_cli_and_missing_sources(tmp_path, capsys):
    assert b.main(["--sources", str(FIXTURE), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "qrels" / "test.tsv").is_file()
    with pytest.raises(SystemExit, match="dpkg-deb -x"):
        b.main(["--sources", str(tmp_path / "nothing"), "--out", str(tmp_path / "p")])


# ------------------------------------------------------------------ the shipped data


def test_shipped_data_loads_and_matches_stats():
    stats = json.loads((SHIPPED / "stats.json").read_text())
    data = load_beir(SHIPPED, split="test")
    assert len(data.query_ids) == len(data.corpus_ids) == stats["queries"] == stats["docs"] == 303
    assert stats["dropped"] == 3 and stats["entries"] == 306
    assert all(data.qrels[q] == {q[:-2] + "-a": 1} for q in data.query_ids)
    assert stats["source"]["debian_version"] == "5.36.0-7+deb12u3"
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()) < 1_000_000
    for row in _jsonl(SHIPPED / "corpus.jsonl"):
        assert row["title"] == "" and len(row["text"]) >= b.MIN_ANSWER_CHARS


def _pod_sources_matching_shipped() -> Path | None:
    """A perl-doc tree (PERLFAQ_SOURCES, else /) whose pods are the ones data/perlfaq was built from."""
    import hashlib

    stats = json.loads((SHIPPED / "stats.json").read_text())
    root = Path(os.environ.get("PERLFAQ_SOURCES", "/"))
    for rel, digest in stats["source"]["files"].items():
        path = root / rel
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return None
    return root


def test_shipped_data_rebuilds_byte_for_byte(tmp_path):
    root = _pod_sources_matching_shipped()
    if root is None:
        pytest.skip("perl-doc 5.36.0 pods not found (set PERLFAQ_SOURCES to an extracted perl-doc)")
    b.build(root, tmp_path)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "stats.json"):
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), name
