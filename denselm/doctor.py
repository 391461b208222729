"""`denselm doctor`: a pre-flight check of training data, before any GPU time.

    denselm doctor configs/smollm2-pyfaq-cpu.yaml --json doctor.json          # the config's data, eval.data, tokenizer
    denselm doctor data/pytrain --eval data/pyfaq --strict                    # a data path (file or folder)
    denselm doctor train.jsonl --tokenizer out/model --data.query_max_len 64 --model out/model

Per dataset (one JSONL file), in one streaming pass plus a few random reads:

- duplicates: exact (same query and positives after lowercasing and keeping only word characters)
  and near (MinHash over word 5-shingles, LSH banding, then the exact Jaccard of each candidate
  pair >= ``--threshold``, default 0.9);
- leakage against ``--eval`` (a BEIR folder; default the config's ``eval.data``): a training
  query, positive or negative equal to an eval query or relevant passage (exact), with Jaccard
  >= threshold (near), or holding >= threshold of an eval text's shingles (contained). A training
  passage that merely quotes an eval query inside a longer text (documentation cross-references
  do) is counted as ``query_mentions`` and is a warning, not a hard problem;
- positives that are also negatives of the same line; sibling positives (a negative here that is
  another line's positive: normal for mined negatives, a false negative when that line has the
  same query);
- truncation at the configured ``data.query_max_len``/``passage_max_len`` (tokenizer: the
  config's model or ``--tokenizer``; on a random sample of ``--sample`` lines) and, with
  ``data.icl_max_examples``, the in-context examples dropped for ``data.icl_token_budget``;
- teacher scores (``pos_scores``/``neg_scores``): quantiles, and the softmax entropy ratio at
  ``loss.teacher_temperature`` with ``denselm score``'s near-uniform warning;
- with ``--model``: negatives the model scores above every positive (likely false negatives).

Prints a one-page summary, writes ``--json``; ``--strict`` exits 1 on a hard problem (leakage, a
positive used as a negative of its own query).
"""

from __future__ import annotations

import json
import logging
import re
import time
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from denselm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ACCEPTS_OVERRIDES = True  # --data.query_max_len 64 ... as for `denselm train`
REPORT_VERSION = 1
MAX_EXAMPLES = 5
"""Sample items kept per finding in the report."""
HARD_CHECKS = ("leakage", "positive_as_negative")

_U64 = np.uint64
_MASK32 = _U64(0xFFFFFFFF)


# ------------------------------------------------------------------------------------ text -> shingles
#
# Texts are analysed in batches, in numpy: the batch is joined with NUL separators, lowercased and
# encoded once; a word is a run of ASCII letters, digits, '_' or any non-ASCII byte (so case,
# punctuation and spacing do not make two texts differ). Word hashes are polynomial hashes over
# the bytes, read off prefix sums (mod 2^64; R is odd, so R^-1 exists mod 2^64). A text's key hashes
# its word sequence the same way; its shingles hash each run of n consecutive words.

_WORD_BYTE = np.zeros(256, dtype=bool)
for _c in b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_":
    _WORD_BYTE[_c] = True
_WORD_BYTE[128:] = True
_R = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)  # odd bases: bytes -> word hash, words -> text key
_R_INV = tuple(pow(r, -1, 2**64) for r in _R)
_POWERS: dict[int, tuple[np.ndarray, np.ndarray]] = {}

# random odd multipliers of the shingle hashes; fixed so reports are reproducible
_RNG = np.random.default_rng(20261202)
_SHINGLE_MULT = (_RNG.integers(1, 2**63, size=64, dtype=np.uint64) * _U64(2) + _U64(1))


def _powers(which: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(R^i, R^-i) for i < length, uint64 (mod 2^64), cached and grown by doubling."""
    have = _POWERS.get(which)
    if have is None or len(have[0]) < length:
        size = max(1 << 16, 1 << (length - 1).bit_length())
        out = []
        for base in (_R[which], _R_INV[which]):
            x = np.full(size, base, dtype=np.uint64)
            x[0] = 1
            with np.errstate(over="ignore"):
                out.append(np.cumprod(x, dtype=np.uint64))  # wraps mod 2^64
        _POWERS[which] = have = (out[0], out[1])
    return have


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit (uint64 in, uint64 out)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> _U64(30))
        x = x * _U64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> _U64(27))
        x = x * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


def _range_hash(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, which: int) -> np.ndarray:
    """Polynomial hash of values[s:e] for each (s, e): (P[e] - P[s]) * R^-s with P the prefix sums of values * R^i."""
    pw, inv = _powers(which, len(values) + 1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(values) + 1, dtype=np.uint64)
        np.cumsum(values * pw[: len(values)], dtype=np.uint64, out=prefix[1:])
        return (prefix[ends] - prefix[starts]) * inv[starts]


def analyze(texts: Sequence[str], n: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys and distinct shingles of a batch of texts.

    Returns ``keys`` (B,) uint64 (equal iff the word sequences are equal, up to 2^-64 collisions),
    ``flat`` (S,) uint64 shingle hashes < 2^32, sorted within each text, and ``starts`` (B + 1,):
    text i's shingles are ``flat[starts[i]:starts[i + 1]]``. A text of k < n words is one k-gram;
    a text without words is one (empty) shingle, 0.
    """
    B = len(texts)
    joined = "\x00".join(texts)
    if joined.count("\x00") != B - 1:  # a NUL inside a text would split it
        joined = "\x00".join(t.replace("\x00", " ") for t in texts)
    buf = np.frombuffer(joined.lower().encode("utf-8", "surrogatepass"), dtype=np.uint8)  # (L,)
    isw = _WORD_BYTE[buf]
    edge = np.diff(np.concatenate([[False], isw, [False]]).astype(np.int8))
    ws, we = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)  # (W,) word byte ranges
    sep = np.flatnonzero(buf == 0)  # (B - 1,) text boundaries
    owner = np.searchsorted(sep, ws)  # (W,) text index of each word
    with np.errstate(over="ignore"):
        wh = _mix64(_range_hash(buf.astype(np.uint64) + _U64(1), ws, we, 0))  # (W,) word hashes
    first = np.searchsorted(owner, np.arange(B))  # (B,) first word of each text
    last = np.searchsorted(owner, np.arange(B), side="right")  # (B,) one past its last word
    count = last - first
    with np.errstate(over="ignore"):
        keys = _mix64(_range_hash(wh, first, last, 1) + count.astype(np.uint64))  # (B,)

    k = np.minimum(count, n)  # (B,) shingle width per text (n, or all words of a short text)
    # window starts: every word i with i + n - 1 in the same text; short texts: their first word
    W = len(wh)
    full = np.zeros(W, dtype=bool)
    if W >= n:
        full[: W - n + 1] = owner[: W - n + 1] == owner[n - 1 :]
    short_starts = first[(count > 0) & (count < n)]
    starts_w = np.concatenate([np.flatnonzero(full), short_starts])  # (S0,)
    width = np.concatenate([np.full(int(full.sum()), n), k[owner[short_starts]] if len(short_starts) else []]).astype(np.int64)
    acc = np.zeros(len(starts_w), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # position-weighted sum of word hashes, mod 2^64
            take = width > j
            acc[take] += wh[starts_w[take] + j] * _SHINGLE_MULT[j]
        sh = _mix64(acc + width.astype(np.uint64)) >> _U64(32)  # (S0,) < 2^32
    owners = np.concatenate([owner[starts_w], np.flatnonzero(count == 0)]).astype(np.uint64)
    sh = np.concatenate([sh, np.zeros(int((count == 0).sum()), dtype=np.uint64)])
    combined = np.sort((owners << _U64(32)) | sh)  # by text, then shingle
    combined = combined[np.r_[True, combined[1:] != combined[:-1]]]  # distinct
    flat = combined & _MASK32
    starts = np.searchsorted(combined >> _U64(32), np.arange(B + 1, dtype=np.uint64))
    return keys, flat, starts


def words(text: str) -> list[str]:
    """The words of a text as ``analyze`` sees them (for reading; the checks hash them in numpy)."""
    return [w.decode("utf-8", "replace") for w in re.findall(rb"[0-9a-z_\x80-\xff]+", text.lower().encode("utf-8"))]


def example_text(query: str, positives: Sequence[str]) -> str:
    """What a duplicate example is compared on: its query and positives."""
    return query + "\n" + "\n".join(positives)


def text_key(text: str) -> int:
    """64-bit key of the normalised text (exact-duplicate and exact-leakage identity)."""
    return int(analyze([text])[0][0])


def shingles(text: str, n: int = 5) -> np.ndarray:
    """(S,) uint64 hashes (< 2^32) of the distinct word n-grams of one text (see ``analyze``)."""
    _, flat, _ = analyze([text], n)
    return flat


class MinHasher:
    """MinHash signatures with ``num_perm`` multiply-shift hash functions, batched in numpy.

    h_p(x) = (a_p * x + b_p mod 2^64) >> 32 with a_p odd is a universal family for 32-bit x
    (Dietzfelbinger et al.), so no modulo is needed. Signatures keep the low 16 bits of each
    minimum (b-bit MinHash, Li & König 2010): two different minima agree with probability 2^-16,
    which LSH and the exact Jaccard check afterwards absorb.
    """

    def __init__(self, num_perm: int = 128, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * _U64(2) + _U64(1)  # (P,) odd
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)  # (P,)

    def signatures(self, flat: np.ndarray, starts: np.ndarray, chunk: int = 32768) -> np.ndarray:
        """(B, P) uint16 signatures of B texts given as ``analyze`` returns them (each >= 1 shingle)."""
        B = len(starts) - 1
        out = np.empty((B, self.num_perm), dtype=np.uint16)
        i = 0
        while i < B:  # texts i..j-1 hold at most `chunk` shingles (or one text holds more)
            j = max(i + 1, int(np.searchsorted(starts, starts[i] + chunk, side="right")) - 1)
            seg = flat[starts[i] : starts[j]]  # (M,)
            vals = np.empty((self.num_perm, len(seg)), dtype=np.uint64)  # (P, M): the min runs along rows
            with np.errstate(over="ignore"):
                np.multiply(self.a[:, None], seg[None, :], out=vals)
                vals += self.b[:, None]
            vals >>= _U64(32)
            out[i:j] = np.minimum.reduceat(vals, starts[i:j] - starts[i], axis=1).T  # low 16 bits kept
            i = j
        return out


def lsh_bands(threshold: float, num_perm: int, recall: float = 0.995) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest candidate pairs) that still make a pair at
    Jaccard ``threshold`` a candidate with probability >= ``recall``: 1 - (1 - t^r)^b."""
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if 1 - (1 - threshold**r) ** b >= recall:
            best = (b, r)
    return best


def lsh_candidate_pairs(sigs: np.ndarray, bands: int, rows: int, max_bucket: int = 8) -> np.ndarray:
    """(K, 2) int64 row pairs (i < j) sharing a band; buckets above ``max_bucket`` rows give
    consecutive and first-member pairs only (linear, not quadratic, in the bucket size)."""
    n = len(sigs)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = []
    mult = _SHINGLE_MULT[:rows]
    for band in range(bands):
        block = sigs[:, band * rows : (band + 1) * rows].astype(np.uint64)  # (N, r)
        with np.errstate(over="ignore"):
            key = _mix64((block * mult[None, :]).sum(axis=1, dtype=np.uint64) + _U64(band))  # (N,)
        order = np.argsort(key, kind="stable")
        sk = key[order]
        cut = np.flatnonzero(sk[1:] != sk[:-1]) + 1
        lo, hi = np.r_[0, cut], np.r_[cut, n]
        for g in np.flatnonzero(hi - lo >= 2):  # only shared buckets reach Python
            grp = order[lo[g] : hi[g]]
            if len(grp) <= max_bucket:
                a, b = np.triu_indices(len(grp), 1)
                pairs.append(np.stack([grp[a], grp[b]], axis=1))
            else:
                grp = np.sort(grp)
                pairs.append(np.stack([grp[:-1], grp[1:]], axis=1))
                pairs.append(np.stack([np.full(len(grp) - 2, grp[0]), grp[2:]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    p = np.concatenate(pairs).astype(np.int64)
    p.sort(axis=1)
    return np.unique(p, axis=0)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard of two distinct-shingle arrays."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


# ------------------------------------------------------------------------------------ eval side


@dataclass
class EvalIndex:
    """The eval texts a training text must not match: queries with judgements, relevant passages."""

    kinds: list[str]
    """"query" or "passage", per eval text."""
    ids: list[str]
    shingles: list[np.ndarray]
    exact: dict[int, list[int]]
    """text_key -> eval text rows."""
    postings: dict[int, list[int]]
    """shingle -> eval text rows holding it."""
    all_shingles: np.ndarray
    """(S,) sorted distinct shingles of every eval text (the cheap first filter)."""
    folder: str = ""


def build_eval_index(folder: str | Path, split: str = "test", n: int = 5) -> EvalIndex:
    from denselm.beir import load_beir

    data = load_beir(folder, split)
    kinds, ids, texts = [], [], []
    for qid, text in zip(data.query_ids, data.query_texts):
        kinds.append("query"), ids.append(qid), texts.append(text)
    relevant = {d for judged in data.qrels.values() for d, g in judged.items() if g > 0}
    for did, text in zip(data.corpus_ids, data.corpus_texts):
        if did in relevant:
            kinds.append("passage"), ids.append(did), texts.append(text)
    keys, flat, starts = analyze(texts, n) if texts else (np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(1, np.int64))
    sh = [flat[starts[i] : starts[i + 1]] for i in range(len(texts))]
    exact: dict[int, list[int]] = {}
    postings: dict[int, list[int]] = {}
    for row, (k, s) in enumerate(zip(keys.tolist(), sh)):
        exact.setdefault(k, []).append(row)
        for x in s.tolist():
            postings.setdefault(x, []).append(row)
    return EvalIndex(kinds, ids, sh, exact, postings, np.unique(flat), str(folder))


def leakage_matches(index: EvalIndex, keys: Sequence[int], flat: np.ndarray, starts: np.ndarray,
                    threshold: float) -> list[list[tuple[int, str, float]]]:
    """For each training text (``analyze`` output): [(eval row, "exact" | "near" | "contained", jaccard)].

    near: Jaccard >= threshold; contained: >= threshold of the eval text's shingles are in the
    training text (an eval passage quoted inside a longer training passage; eval texts of >= 5
    shingles). Only a text whose shingles could reach either bound (np.isin over the batch) gets
    the per-eval-text count.
    """
    out: list[list[tuple[int, str, float]]] = [[] for _ in keys]
    for i, k in enumerate(keys):
        for row in index.exact.get(k, ()):
            out[i].append((row, "exact", 1.0))
    if not len(index.all_shingles) or not len(keys):
        return out
    lengths = np.diff(starts)  # (T,)
    hit = np.isin(flat, index.all_shingles)  # (M,)
    hits = np.add.reduceat(hit.astype(np.int64), starts[:-1]) if len(flat) else np.zeros(len(keys), np.int64)  # (T,)
    # |A n E| >= t |A| (near) or >= t |E| >= 5t (contained), and |A n E| <= hits
    need = np.minimum(np.ceil(threshold * lengths - 1e-9), np.ceil(5 * threshold - 1e-9))
    for i in np.flatnonzero((hits >= need) & (hits > 0)):
        counts: dict[int, int] = {}
        seg = slice(starts[i], starts[i + 1])
        for x in flat[seg][hit[seg]].tolist():
            for row in index.postings[x]:
                counts[row] = counts.get(row, 0) + 1
        done = {row for row, _, _ in out[i]}
        for row, inter in counts.items():
            if row in done:
                continue
            e = len(index.shingles[row])
            jac = inter / (lengths[i] + e - inter)
            if jac >= threshold:
                out[i].append((row, "near", jac))
            elif e >= 5 and inter / e >= threshold:
                out[i].append((row, "contained", jac))
    return out


# ------------------------------------------------------------------------------------ the pass


@dataclass
class Settings:
    threshold: float = 0.9
    """Jaccard of near duplicates / near-exact leakage (and the containment fraction)."""
    shingle: int = 5
    """Words per shingle."""
    num_perm: int = 128
    """MinHash permutations."""
    sample: int = 10000
    """Lines sampled per dataset for truncation and teacher-score uniformity."""
    model_sample: int = 500
    """Lines sampled per dataset for the --model false-negative estimate."""
    seed: int = 0


def _read_lines(plain: str, offsets: Sequence[int], rows: Iterable[int]) -> dict[int, dict]:
    out = {}
    with open(plain, "rb") as f:
        for r in sorted(set(int(x) for x in rows)):
            f.seek(offsets[r])
            out[r] = json.loads(f.readline())
    return out


def check_dataset(path: str, settings: Settings, eval_index: EvalIndex | None = None,
                  tokenizer=None, data_cfg=None, teacher_temperature: float = 1.0, encoder=None,
                  instruction: str | None = None) -> dict:
    """Every check on one dataset file; the report section as a JSON-able dict."""
    from denselm.data.config import DataConfig
    from denselm.data.formats import parse_example

    data_cfg = data_cfg or DataConfig()

    t0 = time.perf_counter()
    from denselm.data.formats import decompressed_copy

    plain = str(decompressed_copy(path)) if path.endswith(".gz") else path
    offsets = array("q")  # byte offset of each example line (for the sampled re-reads)
    line_nos = array("q")  # 1-based line of each example (for messages)
    ex_keys = array("Q")  # key of each example's query + positives
    q_keys = array("Q")
    # flat per-text keys and their rows: 8 bytes each (a line's negatives are contiguous, rows ascending)
    pos_keys, pos_rows, neg_keys, neg_rows = array("Q"), array("q"), array("Q"), array("q")
    pos_as_neg = []  # (row, negative index)
    pos0_scores, neg_scores, gaps = array("d"), array("d"), array("d")
    hasher = MinHasher(settings.num_perm, seed=settings.seed + 1)
    sig_blocks: list[np.ndarray] = []  # (b, P) uint16 MinHash signatures of the example texts
    raw_keys: dict[int, int] = {}  # hash(raw text) -> key: a text repeated verbatim (negatives) is analysed once
    checked: set[int] = set()  # keys already checked for leakage
    leaks: list[dict] = []
    leak_counts = {"exact": 0, "near": 0, "contained": 0, "query_mentions": 0}
    leak_by_kind: dict[str, int] = {}
    file_type = None
    batch: list = []  # (row, Example)

    def process(batch):
        # 1. keys of every text, analysing only texts not seen verbatim before
        texts, where = [], []  # new distinct raw texts, and (row, field) of their first use
        batch_new: dict[int, int] = {}
        for row, ex in batch:
            for fld, group in (("query", (ex.query,)), ("pos", ex.pos), ("neg", ex.neg)):
                for t in group:
                    h = hash(t)
                    if h not in raw_keys and h not in batch_new:
                        batch_new[h] = len(texts)
                        texts.append(t), where.append((row, fld))
        if texts:
            keys, flat, starts = analyze(texts, settings.shingle)
            key_list = keys.tolist()
            for h, i in batch_new.items():
                raw_keys[h] = key_list[i]
            if eval_index is not None:  # 2. leakage of the texts whose key is new
                fresh = [i for i, k in enumerate(key_list) if k not in checked]
                checked.update(key_list)
                if fresh:
                    sel = np.array(fresh)
                    sub_starts = np.concatenate([[0], np.cumsum(starts[sel + 1] - starts[sel])])
                    sub_flat = np.concatenate([flat[starts[i] : starts[i + 1]] for i in fresh])
                    matches = leakage_matches(eval_index, [key_list[i] for i in fresh], sub_flat, sub_starts,
                                              settings.threshold)
                    for i, found in zip(fresh, matches):
                        for erow, how, jac in found:
                            row, fld = where[i]
                            leak_counts[how] += 1
                            if how == "contained" and fld != "query" and eval_index.kinds[erow] == "query":
                                leak_counts["query_mentions"] += 1
                            kind = f"{fld}->{eval_index.kinds[erow]}"
                            leak_by_kind[kind] = leak_by_kind.get(kind, 0) + 1
                            if len(leaks) < 50:
                                leaks.append({"line": int(line_nos[row]), "field": fld,
                                              "eval_kind": eval_index.kinds[erow], "eval_id": eval_index.ids[erow],
                                              "match": how, "jaccard": round(float(jac), 4)})
        # 3. per line: keys, positives used as negatives
        for row, ex in batch:
            pk = [raw_keys[hash(p)] for p in ex.pos]
            nk = [raw_keys[hash(t)] for t in ex.neg]
            q_keys.append(raw_keys[hash(ex.query)])
            pos_keys.extend(pk), pos_rows.extend([row] * len(pk))
            neg_keys.extend(nk), neg_rows.extend([row] * len(nk))
            own = set(pk)
            pos_as_neg.extend((row, j) for j, k in enumerate(nk) if k in own)
        # 4. example keys and MinHash signatures
        keys, flat, starts = analyze([example_text(ex.query, ex.pos) for _, ex in batch], settings.shingle)
        ex_keys.extend(keys.tolist())
        sig_blocks.append(hasher.signatures(flat, starts))

    row = 0
    position = 0
    with open(plain, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            start, position = position, position + len(raw)
            if not raw.strip():
                continue
            ex = parse_example(raw, f"{path}:{line_no}", needs_neg=False)  # DataError names FILE:LINE
            if file_type is None:
                file_type = ex.type
            offsets.append(start), line_nos.append(line_no)
            if ex.has_scores:
                pos0_scores.append(ex.pos_scores[0])
                neg_scores.extend(ex.neg_scores)
                if ex.neg_scores:
                    gaps.append(ex.pos_scores[0] - max(ex.neg_scores))
            batch.append((row, ex))
            row += 1
            if len(batch) >= 1024:
                process(batch)
                batch = []
    if batch:
        process(batch)
    n = row
    if n == 0:
        raise DataError(f"{path}: no examples (the file is empty)")
    del raw_keys
    line_nos = np.frombuffer(line_nos, dtype=np.int64)
    ex_keys = np.frombuffer(ex_keys, dtype=np.uint64)
    q_keys = np.frombuffer(q_keys, dtype=np.uint64)
    sigs_all = np.concatenate(sig_blocks)  # (N, P)
    del sig_blocks

    # ---- duplicates: exact by key, near by MinHash + LSH + exact Jaccard over first occurrences
    _, first, counts = np.unique(ex_keys, return_index=True, return_counts=True)
    exact_dups = int(n - len(first))
    dup_examples = []
    if exact_dups:
        order = np.argsort(ex_keys, kind="stable")
        sk = ex_keys[order]
        same = np.flatnonzero(sk[1:] == sk[:-1])
        dup_examples = [[int(line_nos[order[i]]), int(line_nos[order[i + 1]])] for i in same[:MAX_EXAMPLES]]
    reps = np.sort(first)  # (U,) rows of distinct examples
    bands, rows_per_band = lsh_bands(settings.threshold, settings.num_perm)
    cand = lsh_candidate_pairs(sigs_all[reps], bands, rows_per_band)
    del sigs_all
    # exact Jaccard of each candidate pair, from the re-read lines (few: near duplicates and LSH misses)
    cand_text = _read_lines(plain, offsets, reps[np.unique(cand)] if len(cand) else [])
    cand_sh = {r: shingles(example_text(o["query"], o["pos"]), settings.shingle) for r, o in cand_text.items()}

    parent = np.arange(len(reps))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    near_pairs = []
    for i, j in cand.tolist():
        jac = jaccard(cand_sh[reps[i]], cand_sh[reps[j]])
        if jac >= settings.threshold:
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
            if len(near_pairs) < MAX_EXAMPLES:
                near_pairs.append([int(line_nos[reps[i]]), int(line_nos[reps[j]]), round(jac, 4)])
    roots = np.array([find(i) for i in range(len(reps))], dtype=np.int64)
    near_dups = int(len(reps) - len(np.unique(roots)))
    del cand_text, cand_sh

    # ---- positives used as negatives; sibling positives (another line's positive is a negative here)
    pos_keys_a = np.frombuffer(pos_keys, dtype=np.uint64)
    neg_keys_a = np.frombuffer(neg_keys, dtype=np.uint64)
    neg_rows_a = np.frombuffer(neg_rows, dtype=np.int64)
    own_pos = np.zeros(len(neg_keys_a), dtype=bool)
    if pos_as_neg:
        # mark the negatives that are their own line's positive (not siblings)
        starts = np.searchsorted(neg_rows_a, np.array([r for r, _ in pos_as_neg]))
        own_pos[starts + np.array([j for _, j in pos_as_neg])] = True
    sibling = np.isin(neg_keys_a, pos_keys_a) & ~own_pos  # (Nneg,)
    with np.errstate(over="ignore"):
        pq = _mix64(pos_keys_a * _U64(3) + q_keys[np.frombuffer(pos_rows, dtype=np.int64)])
        nq = _mix64(neg_keys_a * _U64(3) + q_keys[neg_rows_a]) if len(neg_keys_a) else np.zeros(0, np.uint64)
    same_query = sibling & np.isin(nq, pq)  # another line with this query text has it as positive
    sib_lines = np.unique(neg_rows_a[sibling])
    pan_rows = sorted({r for r, _ in pos_as_neg})

    report: dict = {
        "path": path,
        "examples": n,
        "type": file_type,
        "duplicates": {"exact": exact_dups, "near": near_dups, "exact_examples": dup_examples,
                       "near_examples": near_pairs, "lsh": {"bands": bands, "rows": rows_per_band,
                                                            "candidate_pairs": int(len(cand))}},
        "positive_as_negative": {"negatives": len(pos_as_neg), "lines": len(pan_rows),
                                 "examples": [int(line_nos[r]) for r in pan_rows[:MAX_EXAMPLES]]},
        "sibling_positives": {"negatives": int(sibling.sum()), "lines": int(len(sib_lines)),
                              "fraction_of_negatives": float(sibling.mean()) if len(sibling) else 0.0,
                              "same_query": int(same_query.sum()),
                              "examples": [int(line_nos[r]) for r in sib_lines[:MAX_EXAMPLES]]},
        "leakage": None if eval_index is None else {
            "eval": eval_index.folder, "texts_checked": len(checked), **leak_counts, "by_kind": leak_by_kind,
            "examples": leaks[:MAX_EXAMPLES * 4]},
    }

    # ---- sampled checks: truncation, teacher uniformity, the model's false negatives
    rng = np.random.default_rng([settings.seed, zlib.crc32(path.encode())])
    sample_rows = np.sort(rng.choice(n, size=min(n, settings.sample), replace=False))
    sampled = _read_lines(plain, offsets, sample_rows)
    report["truncation"] = (truncation(tokenizer, data_cfg, [sampled[r] for r in sample_rows], file_type, rng)
                            if tokenizer is not None else {"skipped": "no tokenizer (pass --tokenizer or a config)"})
    report["teacher_scores"] = teacher_report(
        pos0_scores, neg_scores, gaps, [sampled[r] for r in sample_rows], teacher_temperature)
    if encoder is not None:
        model_rows = sample_rows[: settings.model_sample] if len(sample_rows) <= settings.model_sample else \
            np.sort(rng.choice(sample_rows, size=settings.model_sample, replace=False))
        report["false_negatives"] = false_negative_rate(encoder, [sampled[r] for r in model_rows], instruction)
    else:
        report["false_negatives"] = None
    report["problems"] = problems(report)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


# ------------------------------------------------------------------------------------ sampled checks


def truncation(tokenizer, cfg, lines: Sequence[dict], file_type: str | None, rng: np.random.Generator) -> dict:
    """Fractions of sampled queries and passages cut at data.query_max_len / passage_max_len, as
    ``denselm.data.collate`` would format and cut them; with ICL, demos dropped for the budget."""
    from denselm.data.formats import TASK_TYPES
    from denselm.data.templates import ICLExample, format_example, format_passage, get_template, split_query
    from denselm.data.tokenize import special_tokens

    if not lines:
        return {"sampled_examples": 0}
    t = get_template(cfg.template)
    spec = TASK_TYPES[file_type or "normal"]
    prefix = len(special_tokens(tokenizer).prefix)

    def lengths(texts):
        return np.array([len(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]], dtype=np.int64)

    def prompt_of(obj):
        p = obj.get("prompt") or cfg.prompt
        return p if p is not None or not t.needs_prompt else ""

    q_texts = ["".join(split_query(t, prompt_of(o), o["query"])) for o in lines]
    q_len = lengths(q_texts) + prefix + 1  # + BOS (if any) + the EOS we append
    if spec.passages_like_queries:  # symmetric tasks: passages get the line's instruction, as queries do
        p_texts = list(dict.fromkeys("".join(split_query(t, prompt_of(o), p))
                                     for o in lines for p in [*o["pos"], *(o.get("neg") or [])]))
    else:
        p_texts = [format_passage(t, p, cfg.passage_prefix)
                   for p in dict.fromkeys(p for o in lines for p in [*o["pos"], *(o.get("neg") or [])])]
    p_len = lengths(p_texts) + prefix + 1

    def part(lens, limit):
        return {"count": int(len(lens)), "max_len": limit, "truncated": int((lens > limit).sum()),
                "fraction": float((lens > limit).mean()) if len(lens) else 0.0,
                "tokens": _quantiles(lens)}

    out = {"sampled_examples": len(lines), "queries": part(q_len, cfg.query_max_len),
           "passages": part(p_len, cfg.passage_max_len)}
    if cfg.icl_max_examples > 0 and t.example_sep is not None:
        # each sampled line as a demo, cut as collate._icl_examples cuts it; then simulate the draws
        def cut(text, k):
            ids = tokenizer([text], add_special_tokens=False)["input_ids"][0]
            return text if len(ids) <= k else tokenizer.decode(ids[:k], skip_special_tokens=False,
                                                                clean_up_tokenization_spaces=False)

        demo_len = lengths([format_example(t, ICLExample(prompt_of(o), cut(o["query"], cfg.example_query_max_len),
                                                         cut(o["pos"][0], cfg.example_passage_max_len)))
                            for o in lines])
        budget = cfg.resolved_icl_token_budget
        drawn = dropped = 0
        for _ in range(len(lines)):
            k = int(rng.integers(0, cfg.icl_max_examples + 1))
            used = 0
            picks = rng.choice(len(lines), size=min(k, len(lines)), replace=False) if k else []
            for m, j in enumerate(picks):
                if used + demo_len[j] > budget:  # the seed stops at the first demo that does not fit
                    dropped += len(picks) - m
                    break
                used += demo_len[j]
            drawn += len(picks)
        out["icl"] = {"budget": budget, "demo_tokens": _quantiles(demo_len),
                      "demos_over_budget_alone": float((demo_len > budget).mean()),
                      "drawn": drawn, "dropped": dropped, "fraction_dropped": dropped / drawn if drawn else 0.0}
    return out


def teacher_report(pos0: Sequence[float], negs: Sequence[float], gaps: Sequence[float], sampled: Sequence[dict],
                   temperature: float) -> dict | None:
    """Teacher-score quantiles over every line, entropy ratios over the sampled lines' groups."""
    from denselm.score import CANDIDATE_TEMPERATURES, UNIFORM_WARNING, teacher_uniformity

    if not pos0:
        return None
    groups = [o["pos_scores"][:1] + o["neg_scores"] for o in sampled if o.get("pos_scores") and o.get("neg_scores")]
    temps = sorted({float(temperature), *CANDIDATE_TEMPERATURES}, reverse=True)
    u = teacher_uniformity(groups, temps)
    ratio = u.mean_ratio.get(float(temperature), 0.0)
    gaps = np.asarray(gaps, dtype=np.float64)
    return {"lines": len(pos0), "positive": _quantiles(pos0), "negative": _quantiles(negs),
            "positive_minus_best_negative": _quantiles(gaps),
            "lines_negative_above_positive": float((gaps < 0).mean()) if len(gaps) else 0.0,
            "temperature": float(temperature),
            "entropy_ratio": {f"{k:g}": round(v, 4) for k, v in u.mean_ratio.items()},
            "entropy_ratio_at_temperature": round(ratio, 4), "near_uniform": bool(ratio > UNIFORM_WARNING),
            "suggested_temperature": u.suggested_temperature, "groups": u.num_groups}


def false_negative_rate(encoder, lines: Sequence[dict], instruction: str | None = None) -> dict:
    """Negatives the model scores above every positive of their line, on the sampled lines."""
    lines = [o for o in lines if o.get("neg")]
    if not lines:
        return {"sampled_lines": 0, "negatives": 0, "above_positive": 0, "rate": 0.0, "lines_with_any": 0}
    texts = list(dict.fromkeys(t for o in lines for t in [*o["pos"], *o["neg"]]))
    at = {t: i for i, t in enumerate(texts)}
    p_emb = encoder.encode_corpus(texts)  # (T, D)
    by_prompt: dict = {}
    for i, o in enumerate(lines):
        by_prompt.setdefault(o.get("prompt") or instruction, []).append(i)
    q_emb = np.empty((len(lines), p_emb.shape[1]), dtype=np.float32)
    for prompt, rows in by_prompt.items():
        q_emb[rows] = encoder.encode_queries([lines[i]["query"] for i in rows], instruction=prompt)
    above = total = lines_any = 0
    for i, o in enumerate(lines):
        s_pos = max(float(p_emb[at[t]] @ q_emb[i]) for t in o["pos"])
        s_neg = np.array([float(p_emb[at[t]] @ q_emb[i]) for t in o["neg"] if t not in o["pos"]])
        k = int((s_neg > s_pos).sum())
        above, total, lines_any = above + k, total + len(s_neg), lines_any + (k > 0)
    return {"sampled_lines": len(lines), "negatives": total, "above_positive": above,
            "rate": above / total if total else 0.0, "lines_with_any": lines_any}


def _quantiles(values) -> dict:
    from denselm.mine import quantiles

    return quantiles(np.asarray(values, dtype=np.float64))


# ------------------------------------------------------------------------------------ verdicts


def problems(r: dict) -> list[dict]:
    """Hard problems (fail --strict) and warnings, each one line."""
    out = []

    def add(severity, check, message):
        out.append({"severity": severity, "check": check, "message": message})

    leak = r.get("leakage")
    if leak and (leak["exact"] or leak["near"] or leak["contained"] > leak["query_mentions"]):
        add("hard", "leakage", f"{leak['exact']} exact, {leak['near']} near and {leak['contained']} contained matches "
                               f"with {leak['eval']} ({', '.join(f'{k}: {v}' for k, v in leak['by_kind'].items())})")
    elif leak and leak["query_mentions"]:
        # a passage quoting an eval question (a cross-reference) teaches no query -> answer pair
        add("warning", "leakage", f"{leak['query_mentions']} training passages quote an eval query of {leak['eval']} "
                                  "inside a longer text (no eval answer or query pair leaks)")
    pan = r["positive_as_negative"]
    if pan["negatives"]:
        add("hard", "positive_as_negative", f"{pan['negatives']} negatives in {pan['lines']} lines are a positive of "
                                            f"the same line, e.g. lines {pan['examples']}")
    d = r["duplicates"]
    if d["exact"] or d["near"]:
        add("warning", "duplicates", f"{d['exact']} exact and {d['near']} near duplicate examples")
    sib = r["sibling_positives"]
    if sib["same_query"]:
        add("warning", "sibling_positives", f"{sib['same_query']} negatives are a positive of another line with the "
                                            "same query (false negatives)")
    tr = r.get("truncation") or {}
    for part in ("queries", "passages"):
        if part in tr and tr[part]["fraction"] > 0.05:
            add("warning", "truncation", f"{tr[part]['fraction']:.1%} of sampled {part} exceed "
                                         f"{tr[part]['max_len']} tokens")
    if "icl" in tr and tr["icl"]["fraction_dropped"] > 0.05:
        add("warning", "truncation", f"{tr['icl']['fraction_dropped']:.1%} of drawn in-context examples are dropped "
                                     f"for the {tr['icl']['budget']}-token budget")
    ts = r.get("teacher_scores")
    if ts and ts["near_uniform"]:
        hint = (f"; loss.teacher_temperature {ts['suggested_temperature']:g} would sharpen it"
                if ts["suggested_temperature"] else "")
        add("warning", "teacher_scores", f"teacher scores near uniform at temperature {ts['temperature']:g} "
                                         f"(entropy ratio {ts['entropy_ratio_at_temperature']:.3f}){hint}")
    if ts and ts["lines_negative_above_positive"] > 0.25:
        add("warning", "teacher_scores", f"the teacher scores a negative above the positive in "
                                         f"{ts['lines_negative_above_positive']:.1%} of lines (false negatives, or "
                                         "positives the teacher does not recognise)")
    fn = r.get("false_negatives")
    if fn and fn["rate"] > 0.05:
        add("warning", "false_negatives", f"the model scores {fn['rate']:.1%} of sampled negatives above their positive")
    return out


def summary(report: dict) -> str:
    """The one-page text summary."""
    lines = [f"denselm doctor: {len(report['datasets'])} dataset(s), {report['hard_problems']} hard problem(s), "
             f"{report['warnings']} warning(s)"]
    for r in report["datasets"]:
        d, pan, sib = r["duplicates"], r["positive_as_negative"], r["sibling_positives"]
        lines.append(f"\n{r['path']}: {r['examples']} examples (type {r['type']}, {r['seconds']:.1f} s)")
        lines.append(f"  duplicates: {d['exact']} exact, {d['near']} near (Jaccard >= {report['settings']['threshold']})")
        lines.append(f"  positive as negative: {pan['negatives']} in {pan['lines']} lines; sibling positives: "
                     f"{sib['negatives']} negatives ({sib['fraction_of_negatives']:.1%}) in {sib['lines']} lines, "
                     f"{sib['same_query']} with the same query")
        leak = r["leakage"]
        if leak is None:
            lines.append("  leakage: not checked (no --eval)")
        else:
            lines.append(f"  leakage vs {leak['eval']}: {leak['exact']} exact, {leak['near']} near, "
                         f"{leak['contained']} contained ({leak['texts_checked']} distinct texts checked)")
            for e in leak["examples"][:3]:
                lines.append(f"    line {e['line']} {e['field']} ~ eval {e['eval_kind']} {e['eval_id']} "
                             f"({e['match']}, Jaccard {e['jaccard']})")
        tr = r["truncation"]
        if "skipped" in tr:
            lines.append(f"  truncation: skipped ({tr['skipped']})")
        elif tr.get("sampled_examples"):
            q, p = tr["queries"], tr["passages"]
            lines.append(f"  truncation ({tr['sampled_examples']} sampled lines): queries {q['fraction']:.1%} over "
                         f"{q['max_len']} (p95 {q['tokens'].get('p95', 0):.0f} tokens), passages {p['fraction']:.1%} "
                         f"over {p['max_len']} (p95 {p['tokens'].get('p95', 0):.0f})")
            if "icl" in tr:
                lines.append(f"  in-context examples dropped for the {tr['icl']['budget']}-token budget: "
                             f"{tr['icl']['fraction_dropped']:.1%}")
        ts = r["teacher_scores"]
        if ts:
            lines.append(f"  teacher scores ({ts['lines']} lines): positive p50 {ts['positive']['p50']:.3f}, negative "
                         f"p50 {ts['negative'].get('p50', float('nan')):.3f}, a negative above the positive in "
                         f"{ts['lines_negative_above_positive']:.1%} of lines; entropy ratio at T="
                         f"{ts['temperature']:g}: {ts['entropy_ratio_at_temperature']:.3f}")
        fn = r["false_negatives"]
        if fn:
            lines.append(f"  model: {fn['above_positive']} of {fn['negatives']} sampled negatives ({fn['rate']:.1%}) "
                         f"score above their positive")
        for p in r["problems"]:
            lines.append(f"  {p['severity'].upper()}: {p['check']}: {p['message']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ entry points


def doctor(paths: Sequence[str], settings: Settings | None = None, eval_folder: str | None = None,
           split: str = "test", tokenizer=None, data_cfg=None, teacher_temperature: float = 1.0,
           encoder=None, instruction: str | None = None, notes: Sequence[str] = ()) -> dict:
    """Check every dataset file under ``paths``; the whole report (see ``check_dataset``)."""
    from denselm.data.config import DataConfig
    from denselm.data.formats import discover_files

    settings = settings or Settings()
    if not 0 < settings.threshold <= 1:
        raise ConfigError(f"--threshold must be in (0, 1], got {settings.threshold}")
    data_cfg = data_cfg or DataConfig()
    t0 = time.perf_counter()
    index = build_eval_index(eval_folder, split, settings.shingle) if eval_folder else None
    datasets = [check_dataset(f, settings, index, tokenizer, data_cfg, teacher_temperature, encoder, instruction)
                for f, _ in discover_files(list(paths))]
    hard = sum(p["severity"] == "hard" for r in datasets for p in r["problems"])
    warn = sum(p["severity"] == "warning" for r in datasets for p in r["problems"])
    return {"version": REPORT_VERSION,
            "settings": {**settings.__dict__, "eval": eval_folder, "split": split,
                         "query_max_len": data_cfg.query_max_len, "passage_max_len": data_cfg.passage_max_len,
                         "template": data_cfg.template, "teacher_temperature": teacher_temperature},
            "notes": list(notes), "datasets": datasets, "hard_problems": hard, "warnings": warn,
            "seconds": round(time.perf_counter() - t0, 3)}


def add_arguments(parser) -> None:
    parser.add_argument("target", nargs="+",
                        help="a training config (.yaml: its data.train_data, eval.data, model tokenizer) or data paths")
    parser.add_argument("--eval", default=None, help="BEIR folder to check for leakage (default: the config's eval.data)")
    parser.add_argument("--split", default="test", help="qrels split of --eval (default test)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder for the truncation check (default: the config's model.name_or_path)")
    parser.add_argument("--model", default=None, help="denselm model folder: estimate the false-negative rate")
    parser.add_argument("--device", default=None, help="device for --model (default: the library's choice)")
    parser.add_argument("--json", default=None, help="write the JSON report here")
    parser.add_argument("--overwrite", action="store_true", help="replace the --json report if it exists")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a hard problem is found")
    parser.add_argument("--threshold", type=float, default=0.9, help="Jaccard of near duplicates (default 0.9)")
    parser.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    parser.add_argument("--sample", type=int, default=10000,
                        help="lines sampled per dataset for truncation and teacher checks (default 10000)")
    parser.add_argument("--model-sample", type=int, default=500, help="lines sampled for --model (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def run(args) -> int:
    from denselm.config import load_config

    overrides = list(args.overrides)
    is_config = len(args.target) == 1 and args.target[0].endswith((".yaml", ".yml"))
    cfg = load_config(args.target[0] if is_config else None, overrides)
    from denselm.outputs import prepare_output

    prepare_output(args.json, args.overwrite, "--json")  # refused if it exists, writable: before any reading
    paths = cfg.data.train_data if is_config else list(args.target)
    if not paths:
        raise ConfigError(f"{args.target[0]}: data.train_data is empty: nothing to check")
    for name in ("num_perm", "sample", "model_sample"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    notes = []
    tokenizer = None
    tok_path = args.tokenizer or (cfg.model.name_or_path if is_config else None)
    if tok_path:
        tokenizer = load_tokenizer(tok_path, cfg.data.template)
        if tokenizer is None:
            notes.append(f"truncation not checked: no tokenizer at {tok_path}")
    eval_folder = args.eval if args.eval is not None else (cfg.eval.data if is_config else None)
    encoder = None
    if args.model:
        from denselm.inference import load_encoder

        encoder = load_encoder(args.model, device=args.device, show_progress=False)
    settings = Settings(threshold=args.threshold, num_perm=args.num_perm, sample=args.sample,
                        model_sample=args.model_sample, seed=args.seed)
    report = doctor(paths, settings, eval_folder, args.split, tokenizer, cfg.data, cfg.loss.teacher_temperature,
                    encoder, cfg.data.prompt, notes)
    text = summary(report)
    for note in notes:
        text += f"\nnote: {note}"
    print(text)
    if args.json:
        from denselm.io import atomic_write

        atomic_write(args.json, json.dumps(report, indent=2) + "\n")
    return 1 if args.strict and report["hard_problems"] else 0


def load_tokenizer(path: str, template: str = "none"):
    """The tokenizer training would use (template tokens added), or None when the folder is absent."""
    from denselm.data.templates import add_template_tokens, get_template

    folder = Path(path).expanduser()
    if not folder.exists():
        logger.warning("tokenizer %s not found: the truncation check is skipped", path)
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if get_template(template).special_tokens:
        add_template_tokens(tok, template)
    return tok
