"""Time and peak memory of tokenizing one huge text, measured in a fresh process.

    python tests/tokenize_probe.py --fixture smollm2 --kind cjk --mb 50 --max-len 64 [--whole]

Prints one JSON line: ``ids`` (what ``tokenize_with_eos`` returns for the text),
``seconds`` and ``rss_mb``: how far the process's peak resident memory rose
above its resident memory just before the call (the Rust tokenizer's
allocations are invisible to tracemalloc).  The peak is Linux's VmHWM, reset
just before the call through /proc/self/clear_refs; where that is refused it is
``ru_maxrss``, which also holds earlier peaks (loading the tokenizer), so the
number can only come out too high.  ``maxrss_mb`` is the plain ``ru_maxrss``
delta (None once the peak was reset: the reset lowers ``ru_maxrss`` too).  ``--whole`` measures the old path instead: tokenize the whole text, then
cut.  The texts have no spaces: one pre-token for byte-level BPE.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

KINDS = ("word", "cjk", "emoji")
CHUNK_BYTES = 1 << 20


@functools.lru_cache(maxsize=None)
def chunk(kind: str, seed: int = 0) -> str:
    """About 1 MiB (UTF-8) of random text of one kind, without spaces."""
    rng = random.Random(seed)
    if kind == "word":  # lowercase letters
        return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=CHUNK_BYTES))
    if kind == "cjk":  # CJK Unified Ideographs, 3 bytes each
        return "".join(chr(0x4E00 + rng.randrange(20000)) for _ in range(CHUNK_BYTES // 3))
    if kind == "emoji":  # Miscellaneous Symbols and Pictographs .. Emoticons, 4 bytes each
        return "".join(chr(0x1F300 + rng.randrange(0x350)) for _ in range(CHUNK_BYTES // 4))
    raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")


def huge_text(kind: str, mb: float) -> str:
    """``mb`` MiB of UTF-8: the 1 MiB chunk repeated (no transient copies, so the peak before the call is the text)."""
    whole, part = divmod(int(mb * CHUNK_BYTES), CHUNK_BYTES)
    c = chunk(kind)
    return c * whole + c[: len(c) * part // CHUNK_BYTES]


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _status_mb(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    return None


def reset_peak() -> bool:
    """Set VmHWM (peak RSS) back to the current RSS; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_mb("VmHWM") is not None


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fixture", required=True)
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--mb", type=float, required=True)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--whole", action="store_true", help="the old path: tokenize the whole text, then cut")
    args = p.parse_args(argv)

    from denselm.data.tokenize import special_tokens, tokenize_with_eos, truncate_with_eos
    from tokenizer_fixtures import fixture_tokenizer

    tok = fixture_tokenizer(args.fixture)
    specials = special_tokens(tok)
    tokenize_with_eos(tok, ["warm up: caches and thread pools"], args.max_len)
    text = huge_text(args.kind, args.mb)
    gc.collect()
    before = max_rss_mb()
    hwm = reset_peak()
    rss_before = _status_mb("VmRSS") if hwm else None
    t0 = time.perf_counter()
    if args.whole:
        ids = [truncate_with_eos(tok([text], add_special_tokens=False)["input_ids"][0], specials, args.max_len)]
    else:
        ids = tokenize_with_eos(tok, [text], args.max_len)
    seconds = time.perf_counter() - t0
    maxrss = None if hwm else max_rss_mb() - before
    rss = _status_mb("VmHWM") - rss_before if hwm else max_rss_mb() - before
    print(json.dumps({"ids": ids[0], "seconds": seconds, "rss_mb": rss, "maxrss_mb": maxrss,
                      "peak_source": "VmHWM" if hwm else "ru_maxrss", "chars": len(text), "baseline_mb": before}))


if __name__ == "__main__":
    main()
