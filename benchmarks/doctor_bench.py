"""`denselm doctor` speed on synthetic training data: examples per second, extrapolated to 1M.

    python benchmarks/doctor_bench.py                         # 100k examples in /tmp, extrapolated to 1M
    python benchmarks/doctor_bench.py --examples 1000000      # the real thing (about 5 GB of JSONL)
    python benchmarks/doctor_bench.py --examples 2000         # smoke test

The synthetic file mimics mined FlagEmbedding data: a 6-14 word query, one 60-120 word positive of
its own, and 7 negatives drawn from the other lines' positives (as `denselm mine` draws them from
the pool), Zipf-distributed words from a 30k vocabulary. 1% of lines are exact copies of an earlier
line, 1% one-word edits of one; the eval folder has 200 queries and passages of which 10 appear in
the training data. Every doctor check runs except truncation and --model (a tokenizer and a model
are the caller's; their cost is a sample of --sample lines, independent of the dataset size).
One JSON line per stage on stdout; the goal is 1M examples within 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _log(**record) -> None:
    print(json.dumps(record), flush=True)


def make_data(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """(training JSONL, BEIR eval folder) with planted duplicates and leaks."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(30000)])
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    p /= p.sum()

    buf, at = np.zeros(0, dtype=np.int64), 0

    def text(lo, hi):
        # words come from one big Zipf draw per block: rng.choice with p= per text would dominate generation
        nonlocal buf, at
        k = int(rng.integers(lo, hi))
        if at + k > len(buf):
            buf, at = rng.choice(len(vocab), size=1 << 20, p=p), 0
        at += k
        return " ".join(vocab[buf[at - k : at]])

    train = folder / "train.jsonl"
    eval_q = [text(6, 14) for _ in range(200)]
    eval_p = [text(60, 120) for _ in range(200)]
    positives: list[str] = []
    last_lines: list[dict] = []  # copies and edits are of recent lines
    with open(train, "w", encoding="utf-8") as f:
        for i in range(n):
            r = rng.random()
            if i > 10 and r < 0.01:  # exact copy of an earlier line
                line = dict(last_lines[int(rng.integers(len(last_lines)))])
            elif i > 10 and r < 0.02:  # one-word edit of an earlier positive
                base = last_lines[int(rng.integers(len(last_lines)))]
                ws = base["pos"][0].split()
                ws[-1] = "edited"
                line = {"query": base["query"], "pos": [" ".join(ws)], "neg": base["neg"]}
            else:
                pos = text(60, 120)
                q = text(6, 14)
                if i < 10:  # leaks: an eval query / relevant passage in training
                    q, pos = (eval_q[i], pos) if i % 2 else (q, eval_p[i])
                negs = [positives[int(j)] for j in rng.integers(0, len(positives), size=7)] if positives else ["none"]
                line = {"query": q, "pos": [pos], "neg": negs}
                positives.append(pos)
                if len(positives) > 20000:  # a bounded pool keeps generation memory flat
                    positives = positives[-20000:]
            f.write(json.dumps(line) + "\n")
            last_lines.append(line)
            if len(last_lines) > 1000:
                del last_lines[:500]
    beir = folder / "eval"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    with open(beir / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(eval_q))
    with open(beir / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(eval_p))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(200)))
    return train, beir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=100_000)
    ap.add_argument("--target", type=int, default=1_000_000, help="extrapolate the time to this many examples")
    ap.add_argument("--dir", default=None, help="where to write the data (default: a temporary folder)")
    args = ap.parse_args()

    from denselm.doctor import Settings, doctor

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        train, beir = make_data(Path(tmp), args.examples)
        size_mb = train.stat().st_size / 1e6
        _log(stage="generate", examples=args.examples, mb=round(size_mb, 1), seconds=round(time.perf_counter() - t0, 1))
        t0, c0 = time.perf_counter(), time.process_time()
        report = doctor([str(train)], Settings(), eval_folder=str(beir))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        r = report["datasets"][0]
        rate = args.examples / dt
        # cpu_seconds: the process's own CPU time (wall time includes waiting on a shared machine)
        _log(stage="doctor", examples=args.examples, seconds=round(dt, 2), cpu_seconds=round(cpu, 2),
             examples_per_s=round(rate), examples_per_cpu_s=round(args.examples / cpu),
             mb_per_s=round(size_mb / dt, 2), threads=os.environ.get("OMP_NUM_THREADS"),
             peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
             exact_duplicates=r["duplicates"]["exact"], near_duplicates=r["duplicates"]["near"],
             lsh_candidate_pairs=r["duplicates"]["lsh"]["candidate_pairs"],
             leaks={k: r["leakage"][k] for k in ("exact", "near", "contained")},
             texts_checked=r["leakage"]["texts_checked"], sibling_positives=r["sibling_positives"]["negatives"])
        _log(stage="extrapolate", examples=args.target, seconds=round(args.target / rate, 1),
             cpu_seconds=round(args.target * cpu / args.examples, 1), within_10_min=bool(args.target / rate <= 600))
    return 0


if __name__ == "__main__":
    sys.exit(main())
