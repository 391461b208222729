"""Build general-domain English training pairs for denselm from WordNet 3.0 (Debian's ``wordnet-base``).

    apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb /tmp/wn   # or: apt-get install wordnet-base
    python scripts/build_wordnet_pairs.py --sources /tmp/wn      # or --sources / (the default) when installed
    python scripts/build_wordnet_pairs.py --no-teacher           # skip the all-MiniLM-L6-v2 scores

What it reads: ``<sources>/usr/share/wordnet/data.{noun,verb,adj,adv}`` (one synset a line:
``offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt pointers... [frames] | gloss``;
the licence header lines start with two spaces and are skipped) and, when present,
``index.{noun,verb,adj,adv}`` (synsets listed in sense-frequency order, used only to decide which
synset wins when two share a query or a definition: the more frequent sense).
The gloss is split into the definition (the text before the first quoted example) and the examples
(the ``"..."`` parts; a gloss with unbalanced quotes keeps its definition but gives no example).
Lemmas get underscores turned into spaces and lose adjective markers (``galore(ip)`` -> ``galore``).

What it writes (under --out, default ``data/general/``), in denselm's training JSONL
(``{"query", "pos": [text], "neg": [7 texts], "pos_scores", "neg_scores", "prompt"}``):
  wordnet-definitions.jsonl.gz   "dog, domestic dog, Canis familiaris (noun)" -> the synset's definition;
                                 prompt "Given a word or phrase, retrieve its definition"
  wordnet-usage.jsonl.gz         an example sentence that contains one of the synset's lemmas (or the
                                 lemma plus s/es/d/ed/ing), the first such example of the synset ->
                                 "lemma: definition"; prompt "Given a sentence, retrieve the meaning of
                                 the word it uses"
  stats.json                     what was kept and dropped at each step, leak examples, sizes, time.

How: definitions under --min-definition-chars (20) are skipped; pairs whose query or passage leaks
into an evaluation set are dropped (the rule of scripts/build_pyfaq_data.py's LeakDetector: more than
half of the smaller text's word 8-grams shared with one query or document of the --eval folders,
by default data/pyfaq, data/pyfaq-large and data/perlfaq, a text under 8 words counting as one
"gram"; missing folders are skipped with a warning); queries and passages are deduplicated on
normalized_text (usage passages on their definition); each kind is then sampled (seeded) to
--definitions / --usage pairs, stratified by part of speech in proportion to the pairs available.
Hard negatives: BM25 over the same kind's sampled passages, ranks 3-30 (``mine_bm25_negatives``,
queried with the pair's query plus its positive, see mining_query); a negative equal to the
positive up to case, punctuation and spacing is never taken, while another sense of the same word
is (a useful hard negative). Teacher scores: cosine similarities from all-MiniLM-L6-v2
(``teacher_scores``, on --threads torch threads). The gzip files are byte-for-byte reproducible
(fixed mtime, seeded sampling; checked with the teacher scores too).

Licence: the text is WordNet 3.0's, Copyright 2006 by Princeton University, under the WordNet 3.0
licence (permission to use, copy, modify and distribute with the copyright notice and disclaimer
kept); it is written with a summary of our changes to data/LICENSE-WordNet.txt (--license).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
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

from denselm.io import iter_jsonl  # noqa: E402

logger = logging.getLogger("build_wordnet_pairs")

ROOT = Path(__file__).resolve().parents[1]
WORDNET_DIR = Path("usr/share/wordnet")
COPYRIGHT = Path("usr/share/doc/wordnet-base/copyright")
FILES = ("noun", "verb", "adj", "adv")
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
POS_ORDER = ("noun", "verb", "adjective", "adverb")
PROMPTS = {
    "definition": "Given a word or phrase, retrieve its definition",
    "usage": "Given a sentence, retrieve the meaning of the word it uses",
}
KINDS = tuple(PROMPTS)
OUT_FILES = {"definition": "wordnet-definitions.jsonl.gz", "usage": "wordnet-usage.jsonl.gz"}
DEFAULT_EVAL = ("data/pyfaq", "data/pyfaq-large", "data/perlfaq")

# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
EXAMPLES_START = re.compile(r'(?:^|;\s*)"')
QUOTED = re.compile(r'"([^"]*)"')


@dataclass(frozen=True)
class Synset:
    """One line of a WordNet ``data.*`` file."""

    file: str
    """noun, verb, adj or adv (the data file)"""
    offset: str
    """byte offset in the data file, 8 digits: the synset's id within its file"""
    ss_type: str
    """n, v, a, s (adjective satellite) or r"""
    lemmas: tuple[str, ...]
    """words of the synset, cleaned: ``Canis familiaris``"""
    definition: str
    examples: tuple[str, ...]
    unbalanced_quotes: bool = False
    """the gloss's examples part had an odd number of quotes (its examples are left out)"""

    @property
    def pos(self) -> str:
        return POS_NAMES[self.ss_type]

    @property
    def source(self) -> str:
        return f"data.{self.file}:{self.offset}"


def clean_lemma(word: str) -> str:
    """``ready_to_hand(p)`` -> ``ready to hand``."""
    return ADJ_MARKER.sub("", word).replace("_", " ")


def split_gloss(gloss: str) -> tuple[str, tuple[str, ...], bool]:
    """(definition, examples, unbalanced) from a gloss ``definition; "example 1"; "example 2"``.

    The definition is everything before the first quote that starts the gloss or follows a
    semicolon (a quote inside the definition, ``as in "carrot and stick"``, stays there);
    examples are the quoted strings after it (attributions like ``--Thomas Paine`` dropped).
    """
    gloss = gloss.strip()
    m = EXAMPLES_START.search(gloss)
    if not m:
        return gloss.rstrip("; ").strip(), (), False
    definition = gloss[: m.start()].rstrip("; ").strip()
    rest = gloss[m.start() :]
    if rest.count('"') % 2:
        return definition, (), True
    examples = tuple(e.strip() for e in QUOTED.findall(rest) if e.strip())
    return definition, examples, False


def parse_line(line: str, file: str) -> Synset | None:
    """A ``data.*`` line -> Synset; None for licence header lines (two leading spaces) and blanks."""
    if line.startswith("  ") or not line.strip():
        return None
    head, sep, gloss = line.partition(" | ")
    if not sep:
        head, gloss = line.rstrip(), ""
    fields = head.split()
    offset, ss_type, w_cnt = fields[0], fields[2], int(fields[3], 16)
    words = fields[4 : 4 + 2 * w_cnt : 2]  # word lex_id word lex_id ...
    definition, examples, unbalanced = split_gloss(gloss)
    return Synset(file, offset, ss_type, tuple(clean_lemma(w) for w in words), definition, examples, unbalanced)


def find_wordnet(sources: Path) -> Path:
    """The folder holding data.noun: ``<sources>/usr/share/wordnet`` (or ``sources`` itself)."""
    for folder in (sources / WORDNET_DIR, sources):
        if (folder / "data.noun").is_file():
            return folder
    raise FileNotFoundError(
        f"no {WORDNET_DIR}/data.noun under {sources} (apt-get download wordnet-base && dpkg-deb -x ...)")


def load_synsets(folder: Path) -> list[Synset]:
    """Every synset of the data files present in ``folder`` (noun, verb, adj, adv order)."""
    synsets = []
    for file in FILES:
        path = folder / f"data.{file}"
        if not path.is_file():
            logger.warning("%s missing: no %s synsets", path, file)
            continue
        with open(path, encoding="utf-8") as f:
            synsets.extend(s for s in (parse_line(line, file) for line in f) if s is not None)
    return synsets


def sense_ranks(folder: Path) -> dict[tuple[str, str], int]:
    """(file, offset) -> the best sense number any of its lemmas gives it in ``index.<file>``.

    Index lines list a lemma's synsets most frequent first; a synset absent from the index
    (or an index absent altogether) gets no entry.
    """
    ranks: dict[tuple[str, str], int] = {}
    for file in FILES:
        path = folder / f"index.{file}"
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("  ") or not line.strip():
                    continue
                fields = line.split()
                n = int(fields[2])
                for sense, offset in enumerate(fields[len(fields) - n :], start=1):
                    key = (file, offset)
                    if sense < ranks.get(key, 1 << 30):
                        ranks[key] = sense
    return ranks


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------


def definition_pair(s: Synset) -> Pair:
    """``dog, domestic dog, Canis familiaris (noun)`` -> the definition."""
    return Pair("definition", f"{', '.join(s.lemmas)} ({s.pos})", s.definition, s.source)


def uses(sentence: str, lemma: str) -> bool:
    """Whether ``sentence`` contains ``lemma`` as whole words (case-insensitive; s/es/d/ed/ing allowed)."""
    words = [re.escape(w) for w in lemma.split()]
    pattern = r"(?<![\w-])" + r"[\s-]+".join(words) + r"(?:s|es|d|ed|ing)?(?![\w-])"
    return re.search(pattern, sentence, flags=re.IGNORECASE) is not None


def usage_pair(s: Synset) -> Pair | None:
    """The synset's first example that uses one of its lemmas -> ``lemma: definition`` (None if none does)."""
    for example in s.examples:
        for lemma in s.lemmas:
            if uses(example, lemma):
                return Pair("usage", example, f"{lemma}: {s.definition}", s.source)
    return None


def mining_query(p: Pair) -> str:
    """The BM25 query negatives are mined with: the pair's query plus its positive passage.

    The query alone is too thin: a definition query ("heterotroph (noun)") matches only the few
    definitions that contain its words, and with it 59% of the definition negatives (and 31% of
    the usage ones) had to be filled at random. With the positive added, the negatives are
    passages close to the positive (related senses, other senses of the same word; 617 and 383
    random fills of 42000 and 21000 with the defaults). Ranks 1-2 are still skipped and passages
    equal to the positive after normalized_text are never taken.
    """
    return f"{p.query} {p.passage}"


def load_eval_texts(folders: list[Path]) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """((set, id, text) for every query and document of the BEIR folders, used, missing)."""
    texts, used, missing = [], [], []
    for folder in folders:
        queries = folder / "queries.jsonl"
        corpora = [folder / "corpus.jsonl", folder / "corpus.jsonl.gz"]
        if not queries.is_file() and not any(c.is_file() for c in corpora):
            logger.warning("evaluation set %s not found: not checked for leaks", folder)
            missing.append(_shown(folder))
            continue
        used.append(_shown(folder))
        for path in [queries, *corpora]:
            if not path.is_file():
                continue
            for _line_no, row in iter_jsonl(path):  # .gz or plain; bad JSON is an error naming file and line
                for field in ("title", "text"):
                    if row.get(field):
                        doc_id = row["_id"] if field == "text" else f"{row['_id']}:title"
                        texts.append((folder.name, doc_id, row[field]))
    return texts, used, missing


def filter_candidates(
    cands: list[tuple[Synset, Pair]],
    kind: str,
    detector: LeakDetector | None,
    eval_texts: list[tuple[str, str, str]],
    min_chars: int,
    ranks: dict[tuple[str, str], int],
    stats: dict,
) -> list[tuple[Synset, Pair]]:
    """Drop short definitions, evaluation-set leaks, then duplicate queries and passages.

    Candidates are visited most frequent sense first (then in file order), so that of two
    synsets sharing a query ("bank (noun)") or a definition the more common sense is kept.
    Usage passages are deduplicated on their definition, so two usage pairs never explain
    their words with the same definition.
    """
    order = sorted(range(len(cands)), key=lambda i: (ranks.get((cands[i][0].file, cands[i][0].offset), 1 << 30), i))
    counts: Counter = Counter()
    examples: list[dict] = []
    closest: list[tuple] = []  # (overlap, source, field, text, eval index) of pairs under the threshold
    seen_q: set[str] = set()
    seen_p: set[str] = set()
    kept = []
    for i in order:
        s, p = cands[i]
        if len(s.definition) < min_chars:
            counts[f"definition under {min_chars} chars"] += 1
            continue
        if detector is not None:
            fields = (("query", p.query), ("passage", p.passage))
            leak = max((detector.overlap(text) + (field,) for field, text in fields), key=lambda t: t[0])
            if leak[0] > detector.threshold:
                name, doc_id, text = eval_texts[leak[1]]
                counts[f"leak into {name} (8-gram overlap > {detector.threshold})"] += 1
                if len(examples) < 20:
                    examples.append({"source": s.source, "field": leak[2], "query": p.query, "passage": p.passage,
                                     "eval": f"{name}:{doc_id}", "eval_text": text[:300], "overlap": round(leak[0], 3)})
                continue
            if leak[0] > 0:
                text = p.query if leak[2] == "query" else p.passage
                closest.append((round(leak[0], 3), s.source, leak[2], text, leak[1]))
        q = normalized_text(p.query)
        key = normalized_text(s.definition if kind == "usage" else p.passage)
        if q in seen_q:
            counts["duplicate query"] += 1
            continue
        if key in seen_p:
            counts["duplicate passage"] += 1
            continue
        seen_q.add(q)
        seen_p.add(key)
        kept.append((i, s, p))
    kept.sort(key=lambda t: t[0])  # back to file order
    stats["dropped"] = dict(sorted(counts.items()))
    stats["leak_examples"] = examples
    kept_sources = {s.source for _, s, _ in kept}
    stats["closest_kept"] = [  # the kept pairs (before sampling) nearest to an evaluation text
        {"overlap": o, "source": src, "field": f, "text": text[:200],
         "eval": "%s:%s" % eval_texts[e][:2], "eval_text": eval_texts[e][2][:200]}
        for o, src, f, text, e in sorted(closest, key=lambda t: (-t[0], t[1]))
        if src in kept_sources][:5]
    return [(s, p) for _, s, p in kept]


def stratified_sample(cands: list[tuple[Synset, Pair]], n: int, seed: int) -> tuple[list[tuple[Synset, Pair]], dict]:
    """``n`` candidates (all when fewer), each part of speech in proportion to its share (largest remainder)."""
    groups: dict[str, list[tuple[Synset, Pair]]] = defaultdict(list)
    for c in cands:
        groups[c[0].pos].append(c)
    total = len(cands)
    n = min(n, total)
    exact = {pos: n * len(groups[pos]) / total if total else 0 for pos in POS_ORDER}
    quota = {pos: int(exact[pos]) for pos in POS_ORDER}
    for pos in sorted(POS_ORDER, key=lambda p: (-(exact[p] - quota[p]), POS_ORDER.index(p)))[: n - sum(quota.values())]:
        quota[pos] += 1
    rng = random.Random(seed)
    chosen = []
    for pos in POS_ORDER:
        chosen.extend(rng.sample(groups[pos], quota[pos]))
    file_order = {(s.file, s.offset): k for k, (s, _) in enumerate(cands)}
    chosen.sort(key=lambda c: file_order[(c[0].file, c[0].offset)])
    return chosen, {"available": {pos: len(groups[pos]) for pos in POS_ORDER}, "sampled": quota}


# ---------------------------------------------------------------------------------------------
# Licence
# ---------------------------------------------------------------------------------------------


def write_license(sources: Path, path: Path, args) -> bool:
    """LICENSE-WordNet.txt: the licence verbatim from the Debian copyright file, holder, our changes."""
    copyright_file = sources / COPYRIGHT
    if not copyright_file.is_file():
        logger.warning("%s not found: %s not written", copyright_file, path)
        return False
    lines = copyright_file.read_text(encoding="utf-8").splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "License: WordNet3.0")
    holder = next(l.split(":", 1)[1].strip() for l in lines[:start][::-1] if l.startswith("Copyright:"))
    body = []
    for l in lines[start + 1 :]:
        if not l.startswith(" "):
            break
        body.append("" if l.strip() == "." else l[1:])  # Debian copyright format: " ." is a blank line
    licence = "\n".join(body).strip()
    notice = f"""\
The text in data/general/wordnet-definitions.jsonl.gz and data/general/wordnet-usage.jsonl.gz
is derived from WordNet 3.0 (Debian package wordnet-base, files usr/share/wordnet/data.noun,
data.verb, data.adj, data.adv), by scripts/build_wordnet_pairs.py.

WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.
(Debian's copyright file gives: {holder}.)

What we changed: we took the synsets' words and glosses only; underscores in words became spaces
and adjective position markers ("(a)", "(p)", "(ip)") were removed; each gloss was split into its
definition and its quoted example sentences; we paired the words of a synset with its definition
("dog, domestic dog, Canis familiaris (noun)" -> definition) and an example sentence with
"word: definition"; we left out definitions under {args.min_definition_chars} characters, pairs overlapping
our evaluation sets, and duplicates; we kept a seeded sample ({args.definitions} definition pairs and
{args.usage} usage pairs at most); we added other synsets' definitions as BM25-mined negative
passages and all-MiniLM-L6-v2 similarity scores.

The WordNet 3.0 licence follows, verbatim.


WordNet 3.0 licence
-------------------

{licence}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(notice, encoding="utf-8")
    return True


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (stats.json stays machine-independent)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _relative_source(folder: Path, root) -> str:
    """``folder`` relative to the package root given as --sources (``usr/share/wordnet``), else as given."""
    try:
        return str(Path(folder).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(folder)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=Path, default=Path("/"),
                    help="root of the extracted wordnet-base package (holding usr/share/wordnet/data.*), or /")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "general")
    ap.add_argument("--license", type=Path, default=ROOT / "data" / "LICENSE-WordNet.txt",
                    help="where to write the licence notice (from usr/share/doc/wordnet-base/copyright)")
    ap.add_argument("--eval", type=Path, nargs="*", default=[ROOT / d for d in DEFAULT_EVAL],
                    help="BEIR folders whose queries and documents no pair may overlap (missing ones are skipped)")
    ap.add_argument("--definitions", type=int, default=6000, help="definition pairs to sample")
    ap.add_argument("--usage", type=int, default=3000, help="usage pairs to sample")
    ap.add_argument("--min-definition-chars", type=int, default=20, help="shorter definitions are skipped")
    ap.add_argument("--num-neg", type=int, default=7)
    ap.add_argument("--neg-ranks", type=int, nargs=2, default=(3, 30), metavar=("FIRST", "LAST"),
                    help="BM25 ranks (1-based, positive included) that negatives are taken from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", default="minilm", help="sentence-transformers folder, or 'minilm' (packaged)")
    ap.add_argument("--no-teacher", action="store_true", help="leave out pos_scores/neg_scores")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the teacher")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()

    folder = find_wordnet(args.sources)
    synsets = load_synsets(folder)
    ranks = sense_ranks(folder)
    stats: dict = {
        "sources": _relative_source(folder, args.sources),  # no machine-specific path: reproducible bytes
        "synsets": dict(Counter(s.pos for s in synsets)),
        "synsets_with_examples": sum(bool(s.examples) for s in synsets),
        "unbalanced_quotes": [s.source for s in synsets if s.unbalanced_quotes],
    }
    logger.info("%d synsets from %s", len(synsets), folder)
    stats["license_written"] = _shown(args.license) if write_license(args.sources, args.license, args) else None

    eval_texts, used, missing = load_eval_texts(args.eval)
    stats["eval_sets"] = {"checked": used, "missing": missing, "texts": len(eval_texts)}
    detector = LeakDetector([t for _, _, t in eval_texts]) if eval_texts else None
    logger.info("leak check against %d texts of %s", len(eval_texts), used)

    candidates = {
        "definition": [(s, definition_pair(s)) for s in synsets],
        "usage": [(s, p) for s in synsets if (p := usage_pair(s)) is not None],
    }
    sizes = {"definition": args.definitions, "usage": args.usage}
    args.out.mkdir(parents=True, exist_ok=True)
    stats["kinds"], stats["files"] = {}, {}
    if not args.no_teacher:
        import torch

        torch.set_num_threads(args.threads)
    for kind in KINDS:
        kstats: dict = {"candidates": len(candidates[kind])}
        kept = filter_candidates(candidates[kind], kind, detector, eval_texts, args.min_definition_chars, ranks, kstats)
        kstats["kept"] = len(kept)
        chosen, kstats["by_pos"] = stratified_sample(kept, sizes[kind], args.seed)
        pairs = [p for _, p in chosen]
        logger.info("%s: %d candidates, %d kept, %d sampled (dropped: %s)", kind, kstats["candidates"], len(kept),
                    len(pairs), kstats["dropped"])
        rows = []
        if pairs:
            num_neg = min(args.num_neg, len(pairs) - 1)  # the random fill needs that many other passages
            if num_neg < args.num_neg:
                logger.warning("%s: only %d pairs, %d negatives each", kind, len(pairs), num_neg)
            mining = [Pair(kind, mining_query(p), p.passage, p.source) for p in pairs]
            negatives = mine_bm25_negatives(mining, num_neg, args.neg_ranks[0], args.neg_ranks[1], args.seed, kstats)
            kstats["bm25_negatives"] = kstats.pop("bm25_negatives")
            scores = None
            if not args.no_teacher:
                from denselm.assets import minilm_dir

                model_dir = minilm_dir() if args.teacher == "minilm" else Path(args.teacher)
                scores = teacher_scores(model_dir, pairs, negatives)
                logger.info("%s: teacher scores done (%.0f s so far)", kind, time.perf_counter() - t0)
            def sense(text: str) -> str:  # what two passages must not share: the definition
                return normalized_text(text.split(": ", 1)[1] if kind == "usage" else text)

            kstats["negatives_with_positive_definition"] = sum(
                sense(n) == sense(p.passage) for p, negs in zip(pairs, negatives) for n in negs)
            for k, (p, negs) in enumerate(zip(pairs, negatives)):
                row = {"query": p.query, "pos": [p.passage], "neg": negs}
                if scores is not None:
                    row["pos_scores"], row["neg_scores"] = scores[0][k], scores[1][k]
                row["prompt"] = PROMPTS[kind]
                rows.append(row)
        path = args.out / OUT_FILES[kind]
        stats["files"][path.name] = {"lines": len(rows), "bytes": write_jsonl(path, rows)}
        stats["kinds"][kind] = kstats
    stats["teacher"] = None if args.no_teacher else args.teacher
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    logger.info("wrote %s in %.0f s", args.out, stats["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
