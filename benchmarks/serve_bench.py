"""Serving throughput and latency: `denselm serve` vs infinity-emb vs a plain sentence-transformers server.

    python benchmarks/serve_bench.py                       # the full run (minutes; results in benchmarks/RESULTS.md)
    python benchmarks/serve_bench.py --quick               # fewer requests per cell
    python benchmarks/serve_bench.py --tiny --quick --engines denselm,st   # plumbing only (the smoke test)

One exported model, four ways to embed the same documents, each in its own process with the same
dtype (float32) and thread count (``--threads``, default 2: OMP/MKL and torch):
  - ``denselm``: ``denselm serve`` (dynamic token-budget batching);
  - ``infinity``: ``infinity_emb v2`` (infinity-emb 0.0.78, torch engine), in its own venv because it pins
    sentence-transformers < 4, numpy < 2 and uvicorn < 0.33; built on first use under
    ``~/.cache/denselm/bench-venvs/infinity`` (``--build-infinity``; skipped with a note when absent);
  - ``st``: a plain sentence-transformers server: one ``model.encode`` per request, in request order
    (what a FastAPI wrapper around ``SentenceTransformer`` does);
  - ``offline``: ``denselm encode``'s path (``Encoder.encode_corpus``) on all texts of a cell at once: the
    reference that a server under load should approach.
The load generator is one asyncio process (httpx) with 1, 8 and 64 concurrent clients, each sending
one text per request (OpenAI ``/v1/embeddings`` shape, float encoding) until the cell's requests are
done; throughput = tokens of the cell's texts / wall time, latency per request on the client.
Every engine is warmed up before timing and checked against the offline vectors (cosine).

Documents only: infinity-emb 0.0.78 runs sentence-transformers 3, which has no Router, so it gets a
plain document-route folder (Transformer -> last-token Pooling -> Normalize); queries (with the
instruction) are not compared.  Short texts: the Python FAQ questions (about 10-20 tokens);
long: windows of the FAQ answers of >= ``--long-tokens`` tokens (default 256).

Model: the demo's trained model (``runs/*/train/model``) when present, else SmolLM2-135M-Instruct
converted from its packaged GGUF, first 16 layers as the demo uses (untrained weights: speed does
not depend on them), else ``--tiny`` (2 random layers, for the smoke test), or ``--model FOLDER``
(a denselm folder).  The passage limit is set to ``--max-len`` (512) so long texts are not cut, and
the folder is exported with ``denselm export --format sentence-transformers``; every engine loads
that one export.

stdout: one JSON line per record (``config``, ``offline``, ``cell``, ``engine``, ``summary``);
stderr: progress and, at the end, the markdown table (also written to ``--table FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

DEFAULT_WORK = Path("~/.cache/denselm/serve-bench").expanduser()
INFINITY_VENV = Path("~/.cache/denselm/bench-venvs/infinity").expanduser()
INFINITY_VERSION = "0.0.78"
# torch wheels on this machine's disk: installed first so pip keeps a CPU build instead of fetching CUDA.
INFINITY_TORCH = "torch==2.13.0"
FAQ_INSTRUCTION = "Given a question about Python, retrieve the passage that answers it"
ENGINES = ("denselm", "infinity", "st")


def log(**record) -> None:
    print(json.dumps(record), flush=True)


def note(msg: str) -> None:
    print(f"[serve_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thread_env(threads: int) -> dict:
    """The same thread settings for every engine (and no network: offline hub, no telemetry)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1", "PYTHONPATH": str(ROOT)}


# ------------------------------------------------------------------------------------ the model


def source_model(args) -> tuple[str, object]:
    """(description, a loaded BiEncoderModel) for the benchmark: --model, the demo's, SmolLM2 16 layers or tiny."""
    import torch

    from denselm.model.encoder import BiEncoderModel

    if args.model:
        return f"--model {args.model}", BiEncoderModel.load(args.model, torch_dtype=torch.float32, device="cpu")
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import tiny_backbone
        from tokenizer_fixtures import fixture_tokenizer

        tok = fixture_tokenizer("smollm2", fresh=True)
        backbone = tiny_backbone("llama", vocab_size=len(tok))
        return "tiny random llama (2 layers, width 64, SmolLM2 tokenizer)", BiEncoderModel(
            model=backbone, tokenizer=tok, normalized=True, position_ids="from_zero",
            manifest={"template": "bge-icl", "prompt": FAQ_INSTRUCTION, "query_max_len": 48})
    demo = sorted(ROOT.glob("runs/*/train/model"), key=lambda p: p.stat().st_mtime)
    if demo:
        return f"demo model {demo[-1]}", BiEncoderModel.load(demo[-1], torch_dtype=torch.float32, device="cpu")
    from denselm.demo import DEFAULT_MODEL_DIR, ensure_model
    from denselm.model.backbone import load_backbone
    from transformers import AutoTokenizer

    folder = ensure_model(DEFAULT_MODEL_DIR)  # converts the packaged GGUF once (about a minute)
    backbone = load_backbone(str(folder), "float32", num_layers=16)
    # Untrained weights: throughput does not depend on them; layers, template and pooling are the demo's.
    return "SmolLM2-135M-Instruct, first 16 layers, untrained", BiEncoderModel(
        model=backbone, tokenizer=AutoTokenizer.from_pretrained(folder), normalized=True, position_ids="from_zero",
        manifest={"template": "bge-icl", "prompt": FAQ_INSTRUCTION, "query_max_len": 48, "num_layers": 16})


def prepare_model(args, work: Path) -> tuple[str, Path]:
    """(description, sentence-transformers export folder); reused when its stamp matches."""
    export = work / ("model-tiny" if args.tiny else "model") / "st"
    stamp = export.parent / "stamp.json"
    key = {"model": args.model, "tiny": args.tiny, "max_len": args.max_len}
    if stamp.exists() and export.exists() and json.loads(stamp.read_text()).get("key") == key:
        return json.loads(stamp.read_text())["description"], export
    desc, model = source_model(args)
    denselm_dir = model.save(export.parent / "denselm", merge_lora=True)
    del model
    # Long texts must not be cut at the demo's 64 tokens: raise the saved passage limit
    # (denselm.json is flat in every format version).
    manifest_path = denselm_dir / "denselm.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["passage_max_len"] = args.max_len
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    cmd = [sys.executable, "-m", "denselm.cli", "export", "--model", str(denselm_dir), "--output", str(export),
           "--format", "sentence-transformers", "--force"]
    note("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env=thread_env(args.threads), stdout=sys.stderr)
    stamp.write_text(json.dumps({"key": key, "description": desc}))
    return desc, export


def plain_document_folder(export: Path, out: Path) -> Path:
    """A sentence-transformers 3 folder for infinity-emb: the export's files with a classic module list.

    ST 3 has no Router: the document route (Transformer -> Pooling -> Normalize) only.  When the export
    already is that classic layout it is used as is."""
    modules = json.loads((export / "modules.json").read_text())
    classic = {"sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
               "sentence_transformers.models.Normalize"}
    if all(m["type"] in classic for m in modules) and modules[0]["path"] == "":
        return export
    import shutil

    weights = next(p.parent for p in sorted(export.rglob("model.safetensors")))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in weights.iterdir():
        if f.is_file() and f.name not in ("modules.json",):
            (out / f.name).symlink_to(f.resolve())
    tok = next(p for p in sorted(export.rglob("tokenizer.json")))
    for f in tok.parent.glob("*token*"):
        target = out / f.name
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(f.resolve())
    manifest = json.loads((export / "denselm.json").read_text()) if (export / "denselm.json").exists() else {}
    pooling = {"last": "lasttoken", "mean": "mean", "first": "cls"}[manifest.get("pooling", "last")]
    dim = json.loads((weights / "config.json").read_text())["hidden_size"]
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": dim, "pooling_mode": pooling}))
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if manifest.get("normalized", True):
        (out / "2_Normalize").mkdir()
        mods.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (out / "modules.json").write_text(json.dumps(mods))
    max_len = manifest.get("passage_max_len", 512)
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_len, "do_lower_case": False}))
    return out


def transformers4_folder(folder: Path, out: Path) -> Path:
    """The folder as transformers 4 (infinity's) reads it: links to every file, with two files rewritten.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` (unknown to 4) and moves
    ``rope_theta`` into ``rope_parameters``: transformers 4 would silently use its default base
    (10000 instead of SmolLM2's 100000; cosine 0.991 to the real vectors)."""
    import shutil

    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg = json.loads((folder / "config.json").read_text())
    tok_ok = tok_cfg.get("tokenizer_class") in (None, "PreTrainedTokenizerFast", "GPT2TokenizerFast",
                                                "LlamaTokenizerFast", "Qwen2TokenizerFast")
    rope = cfg.get("rope_parameters") or {}
    if tok_ok and ("rope_theta" in cfg or "rope_theta" not in rope):
        return folder
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in folder.iterdir():
        if f.name not in ("tokenizer_config.json", "config.json"):
            (out / f.name).symlink_to(f.resolve(), target_is_directory=f.is_dir())
    tok_cfg["tokenizer_class"] = tok_cfg["tokenizer_class"] if tok_ok else "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            cfg.setdefault("rope_scaling", rope)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


# ------------------------------------------------------------------------------------ texts


def make_texts(tokenizer, max_len: int, long_tokens: int, n: int) -> dict[str, tuple[list[str], list[int]]]:
    """{"short": (texts, token counts), "long": ...}: n of each, from the shipped Python FAQ data.

    Token counts are what every engine feeds the model: the export's tokenizer (BOS if any, EOS)
    cut at ``max_len``."""
    queries = [json.loads(line)["text"] for line in (ROOT / "data/pyfaq/queries.jsonl").open()]
    words = " ".join(json.loads(line)["text"] for line in (ROOT / "data/pyfaq/corpus.jsonl").open()).split()

    def count(text: str) -> int:
        return min(len(tokenizer(text)["input_ids"]), max_len)

    short = [queries[i % len(queries)] + ("" if i < len(queries) else f" ({i // len(queries)})") for i in range(n)]
    long = []
    for i in range(n):
        start, size = (i * 97) % max(1, len(words) - 2000), long_tokens * 3 // 4
        text = " ".join(words[start:start + size])
        while count(text) < long_tokens and size < 1500:
            size += 16
            text = " ".join(words[start:start + size])
        long.append(text)
    return {"short": (short, [count(t) for t in short]), "long": (long, [count(t) for t in long])}


# ------------------------------------------------------------------------------------ servers


def st_server_main(args) -> None:
    """``--role st-server``: the plain sentence-transformers baseline, one encode per request, in order."""
    import torch

    torch.set_num_threads(args.threads)
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn
    from sentence_transformers import SentenceTransformer
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    st = SentenceTransformer(str(args.model), device="cpu")
    st.encode(["warm up"])
    worker = ThreadPoolExecutor(max_workers=1)  # the model runs in one thread, requests queue for it
    encode = getattr(st, "encode_document", st.encode)  # ST >= 5: the document route; ST 3-4: plain encode

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def embeddings(request):
        body = await request.json()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vecs = await asyncio.get_running_loop().run_in_executor(
            worker, lambda: encode(texts, batch_size=32, convert_to_numpy=True))
        return JSONResponse({"object": "list", "model": body.get("model", "st"),
                             "data": [{"object": "embedding", "index": i, "embedding": v.tolist()}
                                      for i, v in enumerate(vecs)]})

    app = Starlette(routes=[Route("/health", health), Route("/v1/embeddings", embeddings, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def offline_main(args) -> None:
    """``--role offline``: ``denselm encode``'s Encoder on each cell's texts; one JSON line per text set."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from denselm.inference import load_encoder

    spec = json.loads(Path(args.spec).read_text())
    enc = load_encoder(args.model, device="cpu", dtype="float32", show_progress=False)
    enc.encode_corpus(spec["warmup"])
    np.save(Path(args.spec).with_suffix(".probe.npy"), enc.encode_corpus(spec["probe"]))
    for name, texts in spec["sets"].items():
        t0 = time.perf_counter()
        enc.encode_corpus(texts)
        print(json.dumps({"set": name, "seconds": time.perf_counter() - t0}), flush=True)


class Engine:
    """One server subprocess: started, waited for, stopped (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str, route: str, model_name: str,
                 env: dict, log_path: Path):
        self.name, self.cmd, self.port, self.ready_path, self.route, self.model_name = (
            name, cmd, port, ready_path, route, model_name)
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.log_file = log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        import httpx

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_path.read_text()[-3000:])
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


def start_engine(name: str, model: Path, infinity_model: Path | None, args, work: Path) -> Engine:
    port = free_port()
    env = thread_env(args.threads)
    common = dict(port=port, env=env, log_path=work / f"{name}.log")
    if name == "denselm":
        cmd = [sys.executable, "-m", "denselm.cli", "serve", "--model", f"bench={model}", "--port", str(port),
               "--device", "cpu", "--dtype", "float32", "--torch-threads", str(args.threads),
               # a queue of 64 long texts can take minutes on a loaded CPU: no 504 at the default 60 s
               "--request-timeout-s", "3600"]
        return Engine(name, cmd, ready_path="/ready", route="/v1/embeddings", model_name="bench", **common)
    if name == "st":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "st-server", "--model", str(model),
               "--port", str(port), "--threads", str(args.threads)]
        return Engine(name, cmd, ready_path="/health", route="/v1/embeddings", model_name="bench", **common)
    if name == "infinity":
        cmd = [str(INFINITY_VENV / "bin" / "infinity_emb"), "v2", "--model-id", str(infinity_model),
               "--served-model-name", "bench", "--engine", "torch", "--device", "cpu", "--dtype", "float32",
               "--batch-size", str(args.infinity_batch_size), "--no-bettertransformer", "--port", str(port),
               "--host", "127.0.0.1"]
        return Engine(name, cmd, ready_path="/health", route="/embeddings", model_name="bench", **common)
    raise ValueError(name)


# ------------------------------------------------------------------------------------ load generator


async def run_cell(engine: Engine, texts: list[str], counts: list[int], clients: int) -> dict:
    """``clients`` concurrent loops, each posting one text at a time until all texts are sent."""
    import httpx

    latencies: list[float] = []
    next_i = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=engine.url, limits=limits, timeout=600) as client:
        async def worker():
            nonlocal next_i
            while next_i < len(texts):
                i, next_i = next_i, next_i + 1
                t0 = time.perf_counter()
                resp = await client.post(engine.route, json={"input": [texts[i]], "model": engine.model_name})
                latencies.append(time.perf_counter() - t0)
                if resp.status_code != 200:
                    raise RuntimeError(f"{engine.name}: HTTP {resp.status_code}: {resp.text[:300]}")
                data = resp.json()["data"]
                if len(data) != 1 or not data[0]["embedding"]:
                    raise RuntimeError(f"{engine.name}: malformed response")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, max(0, round(q * len(lat)) - 1))]

    return {"requests": len(texts), "tokens": sum(counts), "wall_s": round(wall, 3),
            "tokens_per_s": round(sum(counts) / wall, 1), "p50_ms": round(1000 * pct(0.50), 1),
            "p99_ms": round(1000 * pct(0.99), 1)}


async def embed(engine: Engine, texts: list[str]):
    import httpx
    import numpy as np

    async with httpx.AsyncClient(base_url=engine.url, timeout=600) as client:
        resp = await client.post(engine.route, json={"input": texts, "model": engine.model_name})
        resp.raise_for_status()
        data = sorted(resp.json()["data"], key=lambda d: d["index"])
    return np.array([d["embedding"] for d in data], dtype=np.float32)


def min_cosine(a, b) -> float:
    import numpy as np

    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


# ------------------------------------------------------------------------------------ infinity venv


def infinity_available() -> bool:
    return (INFINITY_VENV / "bin" / "infinity_emb").exists()


def build_infinity() -> None:
    """The infinity-emb venv: torch from disk first, so that pip keeps it instead of a CUDA build."""
    INFINITY_VENV.parent.mkdir(parents=True, exist_ok=True)
    pip = str(INFINITY_VENV / "bin" / "pip")
    steps = [[sys.executable, "-m", "venv", str(INFINITY_VENV)], [pip, "install", INFINITY_TORCH],
             [pip, "install", f"infinity-emb[server,torch]=={INFINITY_VERSION}"]]
    for cmd in steps:
        note("$ " + " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=sys.stderr)


# ------------------------------------------------------------------------------------ main


def table(rows: list[dict], offline: dict, description: str, args) -> str:
    engines = [e for e in ENGINES if any(r["engine"] == e for r in rows)]
    out = [f"Model: {description}; float32, {args.threads} threads per engine; one text per request; documents only.",
           "", "| inputs | clients | " + " | ".join(f"{e} tok/s (p50 / p99 ms)" for e in engines) + " |",
           "|---|---|" + "---|" * len(engines)]
    for length in ("short", "long"):
        for clients in args.clients:
            cells = []
            for e in engines:
                r = next((r for r in rows if (r["engine"], r["length"], r["clients"]) == (e, length, clients)), None)
                cells.append(f"{r['tokens_per_s']:.0f} ({r['p50_ms']:.0f} / {r['p99_ms']:.0f})" if r else "-")
            out.append(f"| {length} | {clients} | " + " | ".join(cells) + " |")
    for length in ("short", "long"):
        key = f"{length}@{max(args.clients)}"
        if key in offline:
            out.append(f"\nOffline `denselm encode` (Encoder.encode_corpus, all {offline[key]['texts']} texts of the "
                       f"{max(args.clients)}-client {length} cell at once): {offline[key]['tokens_per_s']:.0f} tok/s.")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--role", default="bench", choices=["bench", "st-server", "offline"], help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="a denselm model folder (default: the demo's, else SmolLM2 16 layers)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (plumbing only)")
    p.add_argument("--quick", action="store_true", help="fewer requests per cell (each cell: max(clients, 8) texts)")
    p.add_argument("--engines", default="denselm,infinity,st", help="comma list of denselm, infinity, st")
    p.add_argument("--clients", default="1,8,64", help="concurrent clients per cell (comma list)")
    p.add_argument("--lengths", default="short,long", help="short, long or both")
    p.add_argument("--rounds", type=int, default=None,
                   help="requests per client in a cell (default 2, --quick 1); at least 16 requests per cell (8 quick)")
    p.add_argument("--threads", type=int, default=2, help="torch / OMP threads of every engine (default 2)")
    p.add_argument("--max-len", type=int, default=512, help="passage limit of the exported model (default 512)")
    p.add_argument("--long-tokens", type=int, default=256, help="long texts have at least this many tokens")
    p.add_argument("--infinity-batch-size", type=int, default=32, help="infinity's --batch-size (its default 32)")
    p.add_argument("--build-infinity", action="store_true", help=f"create {INFINITY_VENV} when absent")
    p.add_argument("--work", default=str(DEFAULT_WORK), help=f"model cache and server logs (default {DEFAULT_WORK})")
    p.add_argument("--table", default=None, help="also write the markdown table to this file")
    p.add_argument("--ready-timeout", type=float, default=900, help="seconds an engine may take to load")
    args = p.parse_args(argv)
    if args.role == "st-server":
        st_server_main(args)
        return 0
    if args.role == "offline":
        offline_main(args)
        return 0

    args.clients = [int(c) for c in args.clients.split(",")]
    lengths = [x for x in args.lengths.split(",") if x]
    engines = [e for e in args.engines.split(",") if e]
    if bad := set(engines) - set(ENGINES) or set(lengths) - {"short", "long"}:
        p.error(f"unknown --engines/--lengths entries: {sorted(bad)}")
    rounds = args.rounds or (1 if args.quick else 2)
    min_requests = 8 if args.quick else 16
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    start_load = loadavg()
    if "infinity" in engines and not infinity_available():
        if args.build_infinity:
            build_infinity()
        else:
            note(f"infinity-emb venv {INFINITY_VENV} absent: skipping infinity (pass --build-infinity)")
            engines.remove("infinity")

    description, export = prepare_model(args, work)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    n_max = max(max(c * rounds, min_requests) for c in args.clients)
    texts = make_texts(tokenizer, args.max_len, args.long_tokens, n_max)
    cells = {(length, c): max(c * rounds, min_requests) for length in lengths for c in args.clients}
    log(config={"model": description, "export": str(export), "threads": args.threads, "dtype": "float32",
                "engines": engines, "clients": args.clients, "lengths": lengths, "requests": {f"{k[0]}@{k[1]}": v
                                                                                              for k, v in cells.items()},
                "mean_tokens": {k: round(sum(v[1]) / len(v[1]), 1) for k, v in texts.items()},
                "loadavg_start": start_load, "cpus": os.cpu_count(), "python": sys.version.split()[0]})

    # Offline reference: the texts of the largest cell of each length, in a fresh process.
    probe = texts["short"][0][:2] + texts["long"][0][:2]
    spec_path = work / "offline_spec.json"
    sets = {f"{length}@{max(args.clients)}": texts[length][0][:cells[(length, max(args.clients))]] for length in lengths}
    spec_path.write_text(json.dumps({"warmup": probe + texts["long"][0][:8], "probe": probe, "sets": sets}))
    note("offline denselm encode")
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--role", "offline", "--model", str(export),
                          "--spec", str(spec_path), "--threads", str(args.threads)], env=thread_env(args.threads),
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"offline encode failed:\n{out.stderr[-3000:]}")
    import numpy as np

    probe_vecs = np.load(spec_path.with_suffix(".probe.npy"))
    offline = {}
    for line in out.stdout.splitlines():
        rec = json.loads(line)
        length = rec["set"].split("@")[0]
        tokens = sum(texts[length][1][:len(sets[rec["set"]])])
        offline[rec["set"]] = {"texts": len(sets[rec["set"]]), "tokens": tokens,
                               "tokens_per_s": round(tokens / rec["seconds"], 1)}
        log(offline=rec["set"], **offline[rec["set"]])

    infinity_model = None
    if "infinity" in engines:
        infinity_model = transformers4_folder(plain_document_folder(export, work / "infinity-st3"), work / "infinity-model")
    rows = []
    for name in engines:
        note(f"starting {name}")
        engine = start_engine(name, export, infinity_model, args, work)
        try:
            load_s = engine.wait_ready(args.ready_timeout)
            got = asyncio.run(embed(engine, probe))
            cos = min_cosine(got, probe_vecs)
            # Warm-up: every batch shape class once (a few short and long texts, concurrently).
            for length in lengths:
                asyncio.run(run_cell(engine, texts[length][0][-8:], texts[length][1][-8:], 8))
            log(engine=name, load_s=round(load_s, 1), min_cosine_vs_offline=round(cos, 6), log=str(engine.log_path))
            for length in lengths:
                for clients in args.clients:
                    n = cells[(length, clients)]
                    key = f"{length}@{clients}"
                    try:
                        res = asyncio.run(run_cell(engine, texts[length][0][:n], texts[length][1][:n], clients))
                    except RuntimeError as err:  # an engine that fails a cell is reported, the others still run
                        log(cell=key, engine=name, length=length, clients=clients, error=str(err)[:500])
                        continue
                    row = {"engine": name, "length": length, "clients": clients, **res}
                    if key in offline:
                        row["vs_offline"] = round(res["tokens_per_s"] / offline[key]["tokens_per_s"], 3)
                    rows.append(row)
                    log(cell=key, **row)
                    note(f"{name} {key}: {res['tokens_per_s']:.0f} tok/s, p50 {res['p50_ms']:.0f} ms")
        finally:
            engine.stop()
    end_load = loadavg()
    top = max(args.clients)
    summary = {"loadavg_start": start_load, "loadavg_end": end_load}
    by = {(r["engine"], r["length"], r["clients"]): r for r in rows}
    if ("denselm", "long", top) in by and f"long@{top}" in offline:
        summary["denselm_long_vs_offline"] = by[("denselm", "long", top)]["vs_offline"]
    for length in lengths:
        if ("denselm", length, top) in by and ("infinity", length, top) in by:
            summary[f"denselm_vs_infinity_{length}@{top}"] = round(
                by[("denselm", length, top)]["tokens_per_s"] / by[("infinity", length, top)]["tokens_per_s"], 3)
    log(summary=summary)
    md = table(rows, offline, description, args) + (f"\n\nLoad average (1/5/15 min) at start {start_load}, "
                                                     f"at end {end_load}.")
    print(md, file=sys.stderr)
    if args.table:
        Path(args.table).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
