"""Data-loading speed: the validating index pass (MB/s) and batch production (batches/s, tokens/s).

    python benchmarks/data_loading_bench.py                      # 200 MB synthetic file in /tmp
    python benchmarks/data_loading_bench.py --size-mb 2 --batches 3   # smoke test
    python benchmarks/data_loading_bench.py --tokenizer path/to/hf_tokenizer_folder

Writes one JSON line per stage to stdout.  The synthetic file mimics
FlagEmbedding data: a short query, one positive and 7 negatives of a few
hundred words each (about 5 KB a line).  Without --tokenizer a byte-level BPE
with an 8k vocabulary is trained on a sample of the data (offline).
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


def _log(**record) -> None:
    print(json.dumps(record), flush=True)


def make_file(path: Path, size_mb: float, words: tuple[int, int] = (40, 160), seed: int = 0) -> int:
    """Write about size_mb MB of JSONL (texts of words[0]..words[1] words); returns the number of lines."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(5000)] + "the of and to in is retrieval model query passage".split()
    pool = [" ".join(rng.choice(vocab, size=int(rng.integers(*words)))) for _ in range(2000)]
    target, written, n = size_mb * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            picks = rng.integers(0, len(pool), size=8)
            line = json.dumps({
                "query": f"question {n}: " + pool[picks[0]][:80],
                "pos": [pool[picks[1]]],
                "neg": [pool[i] for i in picks[1:]],
                "prompt": "Given a question, retrieve passages that answer it",
            }) + "\n"
            f.write(line)
            written += len(line.encode())
            n += 1
    return n


def train_tokenizer(sample_file: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with open(sample_file, encoding="utf-8") as f:
        lines = [next(f) for _ in range(200)]
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=float, default=200.0)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the synthetic file goes")
    ap.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer folder (default: train a small BPE)")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--per-device-batch", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--short", action="store_true", help="short texts (5-25 words, about 1 KB a line): more lines per MB")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic file")
    args = ap.parse_args(argv)

    from denselm.data.config import DataConfig
    from denselm.data.dataset import TrainDataset, build_dataloader
    from denselm.data.formats import index_file

    path = Path(args.dir) / f"denselm_bench_{int(args.size_mb)}mb{'_short' if args.short else ''}.jsonl"
    t0 = time.perf_counter()
    lines = make_file(path, args.size_mb, (5, 25) if args.short else (40, 160))
    size = path.stat().st_size
    _log(stage="generate", file=str(path), mb=round(size / 1e6, 1), lines=lines, seconds=round(time.perf_counter() - t0, 1))
    try:
        os.posix_fadvise(os.open(path, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)  # best effort: cold-ish cache
    except (AttributeError, OSError):
        pass

    # the validating pass alone
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    index = index_file(path, group_size=args.group_size)
    dt = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _log(stage="validate", mb_per_s=round(size / 1e6 / dt, 1), lines_per_s=round(len(index) / dt),
         seconds=round(dt, 2), seconds_per_gb=round(dt / (size / 1e9), 1),
         index_bytes=int(index.offsets.nbytes + index.num_neg.nbytes), peak_rss_growth_mb=round((rss1 - rss0) / 1024, 1))

    tokenizer = train_tokenizer(path) if args.tokenizer is None else __import__("transformers").AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = DataConfig(train_data=[str(path)], group_size=args.group_size, query_max_len=64, passage_max_len=256,
                     num_workers=args.workers)
    t0 = time.perf_counter()
    ds = TrainDataset(cfg, tokenizer, per_device_batch_size=args.per_device_batch)
    _log(stage="dataset_init", seconds=round(time.perf_counter() - t0, 2), steps_per_epoch=len(ds))

    n = min(args.batches, len(ds))
    loader = build_dataloader(ds, num_batches=n, num_workers=args.workers)
    t0 = time.perf_counter()
    q_tok = p_tok = 0
    for batch in loader:
        q_tok += batch.query_tokens
        p_tok += batch.passage_tokens
    dt = time.perf_counter() - t0
    _log(stage="batches", batches=n, workers=args.workers, batches_per_s=round(n / dt, 2),
         real_tokens_per_s=round((q_tok + p_tok) / dt), queries_per_batch=args.per_device_batch,
         passages_per_batch=args.per_device_batch * args.group_size,
         tokenizer=args.tokenizer or "bpe-8k (trained here)")
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    sys.exit(main())
