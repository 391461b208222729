"""Shared pieces of speed_bench.py and memory_bench.py: model configs, synthetic token data,
the seed's training step and encoder, denselm's, FLOP accounting, clocks and peak memory.

Not a test helper: the benchmarks import it from their own folder (``sys.path[0]``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

EOS_ID, PAD_ID, FIRST_ID = 2, 0, 3

# Model configs (random init: throughput does not depend on weight values).  The real
# ones are copied from the models' config.json files so nothing is downloaded.
CONFIGS = {
    # The fixed CPU config: Qwen2-style, hidden 256, 4 layers, 4 heads, 2 KV heads.
    "cpu": dict(model_type="qwen2", vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False),
    # Smoke-test size.
    "tiny": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False),
    # Qwen/Qwen2.5-0.5B config.json.
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, use_sliding_window=False),
    # mistralai/Mistral-7B-v0.3 config.json (v0.1's shapes; v0.1's 4096-token sliding window
    # never applies to sequences of at most 512 tokens).
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, sliding_window=None),
}


def log(**record) -> None:
    """One JSON line per result, flushed at once so a timeout still leaves what was measured."""
    print(json.dumps(record), flush=True)


# -------------------------------------------------------------------- data
@dataclass
class DataSpec:
    query_len: tuple[int, int] = (16, 64)
    """Query lengths, uniform in [lo, hi] (EOS included)."""
    passage_median: int = 160
    passage_sigma: float = 0.6
    """Passage lengths: lognormal with this median and log-sd, clipped to [passage_min, passage_cap]."""
    passage_min: int = 16
    passage_cap: int = 512
    vocab: int = 32000


def query_lengths(rng: np.random.Generator, n: int, spec: DataSpec) -> list[int]:
    return rng.integers(spec.query_len[0], spec.query_len[1] + 1, n).tolist()


def passage_lengths(rng: np.random.Generator, n: int, spec: DataSpec) -> list[int]:
    raw = rng.lognormal(math.log(spec.passage_median), spec.passage_sigma, n)
    return np.clip(np.round(raw), spec.passage_min, spec.passage_cap).astype(int).tolist()


def token_rows(rng: np.random.Generator, lengths: list[int], vocab: int) -> list[list[int]]:
    """Random ids, each row ending in EOS (what denselm's tokeniser produces)."""
    return [rng.integers(FIRST_ID, vocab, n - 1).tolist() + [EOS_ID] for n in lengths]


def train_batch(seed: int, n_queries: int, group: int, spec: DataSpec) -> tuple[list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(seed)
    q = token_rows(rng, query_lengths(rng, n_queries, spec), spec.vocab)
    p = token_rows(rng, passage_lengths(rng, n_queries * group, spec), spec.vocab)
    return q, p


def corpus(seed: int, n_docs: int, spec: DataSpec) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return token_rows(rng, passage_lengths(rng, n_docs, spec), spec.vocab)


def padded(seqs: list[list[int]], side: str, device) -> dict[str, torch.Tensor]:
    from denselm.data.tokenize import pad_batch

    return {k: v.to(device) for k, v in pad_batch(seqs, PAD_ID, side).items()}


def padding_fraction(seqs: list[list[int]], batch_rows: int | None = None) -> float:
    """Pad share of a batch padded to its longest row (in chunks of batch_rows rows when given)."""
    rows = batch_rows or len(seqs)
    real = padded_total = 0
    for i in range(0, len(seqs), rows):
        part = seqs[i : i + rows]
        real += sum(len(s) for s in part)
        padded_total += len(part) * max(len(s) for s in part)
    return 1.0 - real / padded_total


# ------------------------------------------------------------------- model
def build_backbone(name: str, device, dtype: torch.dtype, lora_rank: int = 0, checkpointing: bool = False):
    """Random-init AutoModel (no LM head) on ``device``; LoRA on every linear layer when ``lora_rank``."""
    from transformers import AutoConfig, AutoModel

    cfg = dict(CONFIGS[name])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(config, attn_implementation="sdpa", dtype=dtype)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        # peft keeps adapter weights in float32 over a bf16 base (trainables and AdamW state fp32).
        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear",
                                                 lora_dropout=0.0))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model


def model_shape(name: str) -> dict:
    cfg = CONFIGS[name]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    h, i, L, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    # Non-embedding parameters: q, k, v, o, gate, up, down, two norms per layer, the final norm.
    per_layer = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h + 3 * h * i + 2 * h
    if cfg["model_type"] == "qwen2":
        per_layer += heads * head_dim + 2 * kv * head_dim  # q/k/v biases
    return {"layers": L, "d_attn": heads * head_dim, "non_embedding_params": L * per_layer + h}


# ----------------------------------------------------------------- flops
FORMULA = (
    "model FLOPs = sum over real sequences of k_lin * 2N * L + k_att * 4 * layers * L^2 * d_attn, "
    "N = non-embedding parameters, d_attn = heads * head_dim; encoding k_lin = k_att = 1; LoRA training "
    "k_lin = 2 (forward 2N + activation-gradient 2N = 4N per token), k_att = 3 (forward + 2x in backward). "
    "HFU also counts executed work: pad tokens, checkpointing's recomputed forward and gradient caching's extra "
    "forward. MFU/HFU = FLOPs / seconds / measured matmul rate (same device, dtype and threads)."
)


def forward_flops(lengths, shape: dict) -> tuple[float, float]:
    """(linear, attention) FLOPs of one forward pass over sequences of these lengths."""
    n = np.asarray(lengths, dtype=np.float64)
    return float(2 * shape["non_embedding_params"] * n.sum()), float(4 * shape["layers"] * shape["d_attn"] * (n**2).sum())


def step_flops(real_lengths, executed_lengths, shape: dict, train: bool, extra_forwards: int = 0) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one step; ``executed_lengths`` include padding."""
    lin, att = forward_flops(real_lengths, shape)
    model = (2 * lin + 3 * att) if train else (lin + att)
    lin_x, att_x = forward_flops(executed_lengths, shape)
    hardware = ((2 + extra_forwards) * lin_x + (3 + extra_forwards) * att_x) if train else (lin_x + att_x)
    return model, hardware


def matmul_rate(device, dtype: torch.dtype, n: int, repeats: int = 5) -> dict:
    """Measured dense matmul FLOP/s (median of repeats): the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else max(1, int(2e10 // (2 * n**3)))
    walls, cpus = [], []
    a @ b
    for _ in range(repeats):
        with Clock(device) as c:
            for _ in range(inner):
                a @ b
        walls.append(2 * n**3 * inner / c.wall)
        cpus.append(2 * n**3 * inner / c.cpu)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "flops_per_s_wall": float(np.median(walls)),
            "flops_per_s_cpu": float(np.median(cpus))}


# ------------------------------------------------------------------ clocks
class Clock:
    """Wall and this thread's CPU time of a block; CUDA is synchronised around it.

    On a shared CPU machine the wall clock includes other processes' turns; with
    one intra-op thread every FLOP runs on this thread, so its CPU time measures
    our work alone (both are reported).
    """

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._w, self._c = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self._w
        self.cpu = time.thread_time() - self._c


# ---------------------------------------------------------- the seed's way
class SeedStep:
    """The seed's BiEncoderModel step (FlagEmbedding llm_dense_retriever): left-pad each side to
    its batch maximum, hidden state at position -1, normalise, q @ p.T / tau, cross-entropy with
    target i * group; ``sub_batch_size`` chunks with gradients kept; plain autograd."""

    def __init__(self, backbone, temperature: float = 0.02, sub_batch_size: int = -1):
        self.backbone, self.temperature, self.sub_batch_size = backbone, temperature, sub_batch_size

    def encode(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        n = feats["input_ids"].shape[0]
        step = self.sub_batch_size if self.sub_batch_size > 0 else n
        parts = []
        for i in range(0, n, step):
            out = self.backbone(input_ids=feats["input_ids"][i : i + step],
                                attention_mask=feats["attention_mask"][i : i + step], return_dict=True)
            parts.append(F.normalize(out.last_hidden_state[:, -1].float(), dim=-1))
        return torch.cat(parts)

    def loss(self, q_seqs, p_seqs, device) -> torch.Tensor:
        q = self.encode(padded(q_seqs, "left", device))
        p = self.encode(padded(p_seqs, "left", device))
        scores = q @ p.T / self.temperature
        group = p.shape[0] // q.shape[0]
        target = torch.arange(q.shape[0], device=device) * group
        return F.cross_entropy(scores, target)

    @staticmethod
    def executed_lengths(q_seqs, p_seqs, sub_batch_size: int = -1) -> list[int]:
        out = []
        for seqs in (q_seqs, p_seqs):
            rows = sub_batch_size if sub_batch_size > 0 else len(seqs)
            for i in range(0, len(seqs), rows):
                part = seqs[i : i + rows]
                out += [max(len(s) for s in part)] * len(part)
        return out


@torch.no_grad()
def seed_encode(backbone, docs, batch_size: int, device, sort: bool = False) -> torch.Tensor:
    """The seed-style encoder: fixed-size batches left-padded to their max, position -1."""
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i])) if sort else list(range(len(docs)))
    out = [None] * len(docs)
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        feats = padded([docs[r] for r in rows], "left", device)
        reps = F.normalize(backbone(**feats, return_dict=True).last_hidden_state[:, -1].float(), dim=-1)
        for r, v in zip(rows, reps):
            out[r] = v
    return torch.stack(out)


def seed_encode_executed(docs, batch_size: int, sort: bool) -> list[int]:
    seqs = sorted(docs, key=len, reverse=True) if sort else docs
    return SeedStep.executed_lengths([], seqs, batch_size)


# ---------------------------------------------------------- denselm's way
def denselm_model(backbone, *, packing: bool = True, grad_cache_tokens: int | None = None,
                  grad_cache_rows: int | None = None, packing_max_tokens: int | None = None,
                  sub_batch_size: int = -1, position_ids: str | None = None):
    """BiEncoderModel as the benchmarks use it: normalised, tau 0.02; gradient caching when
    a chunk bound (padded tokens and/or rows) is given."""
    from denselm import BiEncoderModel

    kw = {}
    if position_ids:
        kw["position_ids"] = position_ids
    if packing_max_tokens:
        kw["packing_max_tokens"] = packing_max_tokens
    if grad_cache_tokens or grad_cache_rows:
        kw.update(grad_cache=True, grad_cache_max_tokens=grad_cache_tokens, grad_cache_chunk_size=grad_cache_rows)
    model = BiEncoderModel(model=backbone, tokenizer=None, normalized=True, temperature=0.02,
                           sub_batch_size=sub_batch_size, packing=packing, **kw)
    return model.train()


def denselm_loss(model, q_seqs, p_seqs, device) -> torch.Tensor:
    """The collator's right-padded batch in, denselm's forward (packing, grad cache) out."""
    return model(query=padded(q_seqs, "right", device), passage=padded(p_seqs, "right", device),
                 messages=["normal"]).loss


def id_tokenizer():
    """A minimal tokenizer (pad 0, BOS 1, EOS 2) so inference.Encoder can run on raw ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


# ------------------------------------------------------------ peak memory
def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def rss_now_mb() -> float:
    now = _proc_status_mb("VmRSS")
    if now is not None:
        return now
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_mb() -> float:
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated``, or the process's RSS high-water mark.

    CPU: the high-water mark (VmHWM) is reset at the start of the block where the kernel
    allows it, so imports and model building do not mask the step's own peak; where it
    does not, the mark covers the process's whole life (hence a fresh process per variant).
    ``before``: memory held when the block starts (model, optimizer, data); ``peak``: the
    high-water mark during the block; ``step`` = peak - before.
    """

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / 2**20
            self.reset = True
        else:
            self.reset = reset_rss_peak()
            self.before = rss_now_mb()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak = rss_peak_mb()
        self.step = self.peak - self.before

    def record(self) -> dict:
        if self.device.type == "cuda":
            method = "torch.cuda.max_memory_allocated, reset before the step"
        elif self.reset:
            method = "RSS high-water mark (VmHWM) reset before the step, fresh process"
        else:
            method = "RSS high-water mark over the fresh process's life (ru_maxrss)"
        return {"memory_method": method, "peak_mb": round(self.peak, 1), "before_step_mb": round(self.before, 1),
                "step_mb": round(self.step, 1)}


def run_child(script: str, args: list[str], timeout: float | None = None) -> list[dict]:
    """Run ``script`` in a fresh Python process and return the JSON lines it printed."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def environment(device) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = "cpu"
    try:
        import flash_attn  # noqa: F401

        env["flash_attn"] = flash_attn.__version__
    except ImportError:
        env["flash_attn"] = None
    return env
