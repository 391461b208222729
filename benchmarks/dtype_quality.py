"""Retrieval quality of one model encoded in float32 and in bfloat16, side by side (issue 16's bf16 check).

    python benchmarks/dtype_quality.py --model runs/demo/train/model --data data/pyfaq
    python benchmarks/dtype_quality.py --model runs/demo/train/model --data data/pyfaq --dtypes float32,bfloat16,auto

Each dtype loads the model with ``denselm.load_encoder(dtype=...)`` and evaluates it with
``denselm.evaluate.evaluate_model`` (the code `denselm evaluate` runs), timing the whole encode +
search; also reports the cosine between the dtypes' query and passage vectors.  One JSON line per
dtype, then one comparison line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="BEIR folder")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from denselm.beir import load_beir
    from denselm.evaluate import evaluate_model
    from denselm.inference import load_encoder

    data = load_beir(args.data, "test")
    queries, docs = data.query_texts, data.corpus_texts[:500]
    vectors, results, raw = {}, {}, {}
    for name in args.dtypes.split(","):
        enc = load_encoder(args.model, device="cpu", dtype=name, show_progress=False)
        dtype = str(next(enc.model.parameters()).dtype).replace("torch.", "")
        start = time.perf_counter()
        metrics = evaluate_model(enc.encode_queries, enc.encode_corpus, data, ks=(1, 10, 100))
        seconds = time.perf_counter() - start
        vectors[name] = (enc.encode_queries(queries), enc.encode_corpus(docs))
        raw[name] = max(seconds, 1e-9)  # unrounded, never 0: a tiny model can finish within the rounding
        results[name] = {"dtype": name, "weights": dtype, "seconds": round(seconds, 3),
                         "ndcg@10": round(metrics["ndcg@10"], 4), "mrr@10": round(metrics["mrr@10"], 4),
                         "recall@100": round(metrics["recall@100"], 4), "threads": args.threads,
                         "load_avg": [round(x, 2) for x in os.getloadavg()], "model": args.model, "data": args.data}
        print(json.dumps(results[name]), flush=True)
    names = list(results)
    ref = names[0]
    for other in names[1:]:
        cos = [float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
               for a, b in zip(vectors[ref], vectors[other])]
        print(json.dumps({"compare": f"{other} vs {ref}",
                          "ndcg@10_diff": round(results[other]["ndcg@10"] - results[ref]["ndcg@10"], 4),
                          "mrr@10_diff": round(results[other]["mrr@10"] - results[ref]["mrr@10"], 4),
                          "speedup": round(raw[ref] / raw[other], 2),
                          "min_cosine_queries": round(cos[0], 5), "min_cosine_passages": round(cos[1], 5)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
