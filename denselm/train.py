"""The training loop: one code path for 1 CPU, 1 GPU or N processes under torchrun.

    denselm train configs/tiny.yaml --train.max_steps 20
    torchrun --nproc_per_node 8 -m denselm.cli train configs/mistral7b.yaml
    denselm train configs/tiny.yaml --resume latest
    denselm train configs/tiny.yaml --overwrite     # start over in the same train.output_dir

Single process is world size 1: no special case below; how the model is
wrapped, synced and gathered on N processes is ``denselm.parallel``'s.  Per
optimizer step: accumulate ``gradient_accumulation_steps`` micro-batches
(ranks sync on the last), clip, AdamW, schedule; then log, evaluate, checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import yaml

from . import checkpoint as ckpt
from . import distributed, parallel
from .config import Config, load_config, resume_changes
from .data.dataset import TrainDataset, build_dataloader
from .data.templates import add_template_tokens, get_template
from .errors import ConfigError, DataError, ModelNotFound
from .io import atomic_write, check_writable, fault_point, remove_stale_temps
from .model.backbone import apply_lora, decoder_layers, load_backbone, trainable_to_fp32
from .model.encoder import BiEncoderModel
from .outputs import check_run_folder, clear_run_folder
from .spec import spec_from_config

logger = logging.getLogger("denselm.train")
ACCEPTS_OVERRIDES = True  # the CLI passes --section.key overrides through (as args.overrides)


class TrainingError(RuntimeError):
    """A run that cannot continue (NaN loss...); the last good checkpoint is intact."""


# ------------------------------------------------------------------ building
def build_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    name = str(Path(cfg.model.name_or_path).expanduser())
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as err:  # transformers' "not a local folder and not a valid model identifier" (or offline)
        raise ModelNotFound(
            f"model.name_or_path {cfg.model.name_or_path}: neither a model folder here nor reachable on the hub "
            f"({str(err).splitlines()[0][:200]}); give a local folder, or go online / set HF_HUB_OFFLINE=0"
        ) from None
    if tok.eos_token is None:
        raise ConfigError(f"model.name_or_path: the tokenizer of {cfg.model.name_or_path} has no eos_token")
    added = []
    template = get_template(cfg.data.template)
    if template.special_tokens:
        before = set(tok.get_vocab())
        add_template_tokens(tok, template)
        added = [t for t in template.special_tokens if t not in before]
    return tok, added


def build_model(cfg: Config, tokenizer, added_tokens: list[str]) -> BiEncoderModel:
    backbone = load_backbone(cfg.model.name_or_path, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.num_layers)
    trainable_token_ids = None
    if len(tokenizer) > backbone.get_input_embeddings().weight.shape[0]:
        backbone.resize_token_embeddings(len(tokenizer))
    if added_tokens:
        trainable_token_ids = tokenizer.convert_tokens_to_ids(added_tokens)
    if cfg.model.lora.enabled:
        backbone = apply_lora(backbone, cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout,
                              cfg.model.lora.target_modules, trainable_token_ids, cfg.model.lora.top_layers)
    n_trainable = trainable_to_fp32(backbone)
    n_total = sum(p.numel() for p in backbone.parameters())
    logger.info("model: %s, %d layers, %.1fM parameters, %.2fM trainable (float32)", cfg.model.name_or_path,
                len(decoder_layers(backbone)), n_total / 1e6, n_trainable / 1e6)
    model = BiEncoderModel(
        model=backbone,
        tokenizer=tokenizer,
        spec=spec_from_config(cfg, added_tokens),
        temperature=cfg.model.temperature,
        negatives_cross_device=cfg.loss.negatives_cross_device and distributed.info().world_size > 1,
        sub_batch_size=cfg.loss.sub_batch_size,
        teacher_temperature=cfg.loss.teacher_temperature,
        distill_weight=cfg.loss.distill_weight,
        distill_loss=cfg.loss.distill_loss,
        distill_in_custom_mode=cfg.loss.distill_in_custom_mode,
        grad_cache=cfg.loss.grad_cache,
        grad_cache_chunk_size=cfg.loss.grad_cache_chunk_size,
        grad_cache_max_tokens=cfg.loss.grad_cache_max_tokens,
        loss_options=cfg.loss.options(),
    )
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.train.cache_frozen_layers:
        num_frozen = len(decoder_layers(backbone)) - cfg.model.lora.top_layers
        if num_frozen < 1:
            raise ConfigError(f"train.cache_frozen_layers: model.lora.top_layers={cfg.model.lora.top_layers} "
                              "adapts every layer, nothing is frozen to cache")
        try:
            model.enable_prefix_cache(num_frozen, int(cfg.train.cache_max_gb * 2**30))
        except ValueError as err:
            raise ConfigError(f"train.cache_frozen_layers: {err}") from None
        logger.info("caching the output of the %d frozen layers per text (up to %.1f GiB)", num_frozen,
                    cfg.train.cache_max_gb)
    return model


def lr_lambda(cfg: Config, total_steps: int):
    warmup = int(round(cfg.train.warmup_fraction * total_steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.train.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.train.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return f


def build_teacher(cfg: Config, model: BiEncoderModel):
    """loss.embed_distill_*: the cached teacher embedder, and the model's distillation head (None when off)."""
    if not cfg.loss.embeds_distilled:
        return None
    from .teacher_embeddings import TeacherEmbeddings

    teacher = TeacherEmbeddings(cfg.loss.embed_distill_teacher, cfg.loss.embed_distill_cache,
                                dtype=cfg.loss.embed_distill_dtype, max_length=cfg.loss.embed_distill_max_length)
    model.enable_embedding_distillation(teacher.dim, cfg.loss.embed_distill_weight,
                                        cfg.loss.similarity_distill_weight, cfg.loss.embed_distill_distance,
                                        similarity_kind=cfg.loss.similarity_distill_kind,
                                        teacher_temperature=cfg.loss.teacher_temperature)
    return teacher


def teacher_batch(teacher, batch, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(queries (B, Dt), passages (B * G, Dt)) teacher embeddings of this rank's batch (cached on disk)."""
    if teacher is None:
        return None
    return (torch.from_numpy(teacher.embed(batch.query_texts)).to(device),
            torch.from_numpy(teacher.embed(batch.passage_texts)).to(device))


def micro_batches(batch, accum: int, cross_device: bool, teacher_embeddings=None) -> list[dict]:
    """Split this rank's step batch into ``accum`` model inputs of B queries each.

    Rows keep the step batch's padding (so positions, hence numbers, are those of
    the big batch).  The false-negative mask keeps the columns of the passages
    each micro-batch is scored against: its own (and, cross-device, the same
    micro-batch of every other rank).
    """
    total = batch.batch_size
    if total % accum:
        raise ConfigError(
            f"a batch of {total} queries (dataset {batch.dataset}) does not split into "
            f"train.gradient_accumulation_steps={accum} micro-batches"
        )
    B, G, W, r = total // accum, batch.group_size, batch.world_size, batch.rank
    mask = batch.false_negative_mask  # (B * accum, W * B * accum * G) or None
    out = []
    for m in range(accum):
        q_rows, p_rows = slice(m * B, (m + 1) * B), slice(m * B * G, (m + 1) * B * G)
        fn = None
        if mask is not None:
            ranks = range(W) if cross_device else [r]
            cols = torch.cat([torch.arange((k * total + m * B) * G, (k * total + (m + 1) * B) * G) for k in ranks])
            fn = mask[q_rows][:, cols.to(mask.device)]
        out.append({
            "query": {k: v[q_rows] for k, v in batch.query.items()},
            "passage": {k: v[p_rows] for k, v in batch.passage.items()},
            "messages": batch.messages,
            "teacher_scores": None if batch.teacher_scores is None else batch.teacher_scores[p_rows],
            "false_negative_mask": fn,
            **({} if teacher_embeddings is None else
               {"teacher_embeddings": (teacher_embeddings[0][q_rows], teacher_embeddings[1][p_rows])}),
        })
    return out


def pick_device(cfg: Config) -> torch.device:
    if cfg.train.device:
        return torch.device(cfg.train.device)
    if torch.cuda.is_available():
        return torch.device("cuda", distributed.info().local_rank)
    return torch.device("cpu")


# ------------------------------------------------------------------- logging
class RunLog:
    """JSON lines in ``log.jsonl`` (rank 0), TensorBoard when installed."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = output_dir / "log.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop lines of steps after the checkpoint: they are about to be re-run.
            kept = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            atomic_write(self.path, "".join(l + "\n" for l in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("train.tensorboard is true but tensorboard is not installed (pip install tensorboard); "
                               "logging to %s only", self.path)
            else:
                self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])


# ---------------------------------------------------------------- evaluation
def evaluate_during_training(model: BiEncoderModel, cfg: Config, data,
                             strategy: parallel.Strategy | None = None) -> dict[str, float]:
    from .evaluate import evaluate_model
    from .inference import Encoder

    strategy = strategy or parallel.Single()
    enc = Encoder(model_for_save(model, strategy), batch_size=cfg.eval.batch_size, show_progress=strategy.is_main)
    # eval.query_instruction, else the spec's prompt (data.prompt: see spec_from_config)
    instruction = cfg.eval.query_instruction
    ks = sorted({1, 10, 100, int(cfg.eval.metric.split("@")[1]) if "@" in cfg.eval.metric else 10})
    return evaluate_model(lambda t: enc.encode_queries(t, instruction=instruction), enc.encode_corpus, data, ks=ks)


# ---------------------------------------------------------------------- loop
def train(cfg: Config, resume: str | None = None, overwrite: bool = False) -> Path:
    """Run training; returns the final model folder (``output_dir/model``).

    ``resume``: "latest" or a checkpoint folder; ``overwrite``: clear what an earlier run wrote in
    ``train.output_dir`` first. Without either, a non-empty ``train.output_dir`` is refused
    (``denselm.outputs``): two runs never mix in one folder.
    """
    cfg.validate_paths()
    strategy = parallel.setup(cfg.train.strategy)
    rank, world = strategy.rank, strategy.world_size
    if cfg.train.merge_lora and cfg.model.lora.enabled and not strategy.supports_merge_lora:
        raise ConfigError(f"train.merge_lora is not supported with train.strategy {cfg.train.strategy}; "
                          "run denselm export afterwards")
    output_dir = Path(cfg.train.output_dir)
    check_run_folder(output_dir, resume, overwrite)  # nothing read or deleted yet
    # Every rank checks the path (a bad one fails everywhere); rank 0's `latest` wins, as
    # ranks listing a shared folder could see different newest checkpoints.
    resume_path = strategy.broadcast_object(ckpt.resolve_resume(output_dir, resume))
    if resume_path is not None:
        check_resume_config(cfg, resume_path, output_dir)  # before the model: no tensor size-mismatch traceback
    check_writable(output_dir, "train.output_dir")  # before any model loads
    if strategy.is_main:
        for folder in (output_dir, output_dir / "checkpoints"):
            remove_stale_temps(folder)  # leftovers of a killed checkpoint or model write
    device = pick_device(cfg)
    torch.manual_seed(cfg.train.seed)  # the same LoRA init on every rank (a sharded wrap does not broadcast it)

    tokenizer, added_tokens = build_tokenizer(cfg)
    accum = cfg.train.gradient_accumulation_steps
    # One sampler batch = one optimizer step (per_device x accum queries per rank), split into
    # micro-batches below: accumulation sees the same examples as one big batch would.
    dataset = TrainDataset(cfg.data, tokenizer, cfg.train.per_device_batch_size * accum, world_size=world, rank=rank)
    if strategy.is_main:
        logger.info(dataset.summary())
    total_steps = cfg.train.max_steps or max(1, cfg.train.epochs * dataset.steps_per_epoch)

    model = build_model(cfg, tokenizer, added_tokens)
    teacher = build_teacher(cfg, model)
    model = strategy.wrap(model.to(device), device)
    torch.manual_seed(cfg.train.seed + rank)  # dropout: each rank its own masks
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  betas=tuple(cfg.train.adam_betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")

    step, best = 0, None
    if resume_path is not None:
        state = ckpt.restore_training_state(resume_path, strategy, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        step, best = state["step"], state.get("best")
        logger.info("resumed from %s at step %d", resume_path, step)
    elif resume == "latest":
        logger.info("--resume latest: no checkpoint in %s, starting from scratch", output_dir)

    eval_data = None
    if cfg.eval.data:
        from .beir import load_beir

        eval_data = load_beir(cfg.eval.data, cfg.eval.split)
        if cfg.eval.max_queries:
            keep = set(list(eval_data.qrels)[: cfg.eval.max_queries])
            eval_data.qrels = {q: v for q, v in eval_data.qrels.items() if q in keep}

    if strategy.is_main:
        if overwrite:  # only now: a bad model name or data file must not cost the old run
            removed = clear_run_folder(output_dir)
            if removed:
                logger.info("--overwrite: removed %s from %s", ", ".join(p.name for p in removed), output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(output_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    # --resume without a checkpoint starts from step 0: the lines of the run that died before its
    # first checkpoint go, they are about to be re-run
    log = RunLog(output_dir, strategy.is_main, cfg.train.tensorboard, step if resume is not None else None)
    loader = build_dataloader(dataset, *dataset.position(step), num_batches=total_steps - step)
    batches = iter(loader)  # draws a seed from the torch RNG: before restoring it, as in the first run
    if resume_path is not None:
        ckpt.set_rng_state(state["rng"])
        if state.get("rank_rng") and len(state["rank_rng"]) == world:
            torch.set_rng_state(torch.tensor(state["rank_rng"][rank], dtype=torch.uint8))
    progress = None
    if strategy.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    model.train()
    started, tokens_seen = time.perf_counter(), 0
    while step < total_steps:
        # ---- one optimizer step: accumulate micro-batches (ranks sync on the last one)
        loss_sum, parts = 0.0, {}
        batch = next(batches).to(device, non_blocking=True)
        teacher_emb = teacher_batch(teacher, batch, device)
        for micro, mb in enumerate(micro_batches(batch, accum, model.negatives_cross_device, teacher_emb)):
            # Gradient caching suspends sync itself, chunk by chunk, and syncs its last chunk.
            sync = micro == accum - 1 or cfg.loss.grad_cache
            with strategy.no_sync(model, enabled=not sync):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = model(**mb)
                scaler.scale(out.loss / accum).backward()
            loss_sum += float(out.loss.detach())
            for k, v in out.metrics.items():
                parts[k] = parts.get(k, 0.0) + v / accum
        for k in sorted(k for k in parts if k.startswith("masked/")):  # the global batch's fraction, not rank 0's
            parts[k] = float(distributed.all_reduce_mean(torch.tensor(parts[k], dtype=torch.float64)))
        fn_count, real_tokens = batch.num_false_negatives, batch.query_tokens + batch.passage_tokens
        loss_value = float(distributed.all_reduce_mean(torch.tensor(loss_sum / accum, dtype=torch.float64)))
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"loss is {loss_value} at step {step + 1}; stopping. The last good checkpoint is intact"
                + (f" ({ckpt.list_checkpoints(output_dir)[-1]})" if ckpt.list_checkpoints(output_dir) else "")
                + ". Try a lower train.lr, train.precision bf16 instead of fp16, or a larger model.temperature."
            )
        if model.embed_distill is not None:  # outside the wrapped backbone: average its gradient here
            distributed.all_reduce_grads_mean(model.embed_distill.parameters())
        scaler.unscale_(optimizer)
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm) if cfg.train.max_grad_norm
                     else torch.tensor(0.0))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if cfg.train.max_minutes is not None and step < total_steps:
            # Ranks' clocks differ: stop where any rank is over budget, all at the same step.
            over = float(time.perf_counter() - started >= 60.0 * cfg.train.max_minutes)
            if float(distributed.all_reduce_mean(torch.tensor(over, dtype=torch.float64))) > 0:
                if strategy.is_main:
                    logger.info("train.max_minutes=%g reached after step %d of %d: stopping here (final evaluation "
                                "and model follow)", cfg.train.max_minutes, step, total_steps)
                total_steps = step  # this step is the last: the bookkeeping below evaluates and saves

        # ---- bookkeeping: logs, evaluation, checkpoints
        tokens_seen += real_tokens * world
        elapsed = time.perf_counter() - started
        record = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                  "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "false_negatives_masked": fn_count,
                  "same_document_masked": batch.num_same_document,
                  "epoch": round(step / dataset.steps_per_epoch, 4),
                  **{f"batch/{k}": v for k, v in batch.stats().items()}, **parts}
        if model.prefix_cache is not None:
            record.update(model.prefix_cache.stats())
        if eval_data is not None and ((cfg.eval.every and step % cfg.eval.every == 0) or step == total_steps):
            metrics = evaluate_during_training(model, cfg, eval_data, strategy)
            record.update({f"eval/{k}": v for k, v in metrics.items()})
            value = metrics.get(cfg.eval.metric)
            if value is None:
                raise ConfigError(f"eval.metric {cfg.eval.metric!r} is not one of {sorted(metrics)}")
            if best is None or value > best["value"]:
                best = {"step": step, "value": value, "metric": cfg.eval.metric}
                save_model(model, strategy, output_dir / "best")
            model.train()
        if step % cfg.train.log_every == 0 or step == total_steps:
            log.write(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == total_steps:
            save_training_checkpoint(model, cfg, strategy, optimizer, scheduler, step, best, output_dir)
        fault_point("train.step")  # tests: DENSELM_FAULT=train.step:kill@3 (see denselm.io)

    if progress is not None:
        progress.close()
    final = output_dir / "model"
    save_model(model, strategy, final)
    if cfg.train.merge_lora and cfg.model.lora.enabled:
        save_model(model, strategy, output_dir / "model-merged", merge_lora=True)
    if strategy.is_main:
        logger.info("saved %s%s", final, f" (best {best['metric']} {best['value']:.4f} at step {best['step']})" if best else "")
    strategy.barrier()
    strategy.teardown()
    return final


def save_model(model: BiEncoderModel, strategy: parallel.Strategy, path: Path, merge_lora: bool = False) -> None:
    """Rank 0 writes the model folder; every rank first helps gather the full weights."""
    # Merging reads the (unsharded) base weights from the module itself.
    full_state = None if merge_lora else strategy.full_state_dict(model)
    if strategy.is_main:
        model_for_save(model, strategy).save(path, state_dict=full_state, merge_lora=merge_lora)
    strategy.barrier()


def model_for_save(model: BiEncoderModel, strategy: parallel.Strategy) -> BiEncoderModel:
    """The BiEncoderModel around the unwrapped backbone, for saving and evaluating on one
    rank without the wrapper's collectives (the same spec and settings: ``with_backbone``)."""
    bare = strategy.unwrap(model.model)
    if bare is not model.model:
        return model.with_backbone(bare, negatives_cross_device=False)
    return model


def save_training_checkpoint(model, cfg, strategy, optimizer, scheduler, step, best, output_dir) -> None:
    protect = None
    if best is not None:
        protect = output_dir / "checkpoints" / f"step-{best['step']:07d}"
    ckpt.save_training_state(
        output_dir, step, strategy, model, optimizer, {"scheduler": scheduler.state_dict(), "best": best},
        yaml.safe_dump(cfg.to_dict(), sort_keys=False), cfg.train.keep_last, protect,
    )


def check_resume_config(cfg: Config, resume_path: Path, output_dir: Path) -> None:
    """Refuse a resume whose config differs from the saved one outside ``config.RESUMABLE_KEYS``.

    The saved config is the checkpoint's own ``config.yaml`` (the state about to be loaded), else
    the run folder's. One line naming each key, saved -> new (exit 2).
    """
    saved_path = next((p for p in (resume_path / "config.yaml", output_dir / "config.yaml") if p.is_file()), None)
    if saved_path is None:
        return
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DataError(f"{saved_path}: unreadable saved config ({type(err).__name__}); "
                        "restore it from the checkpoint's config.yaml") from None
    changes = resume_changes(saved, cfg)
    if changes:
        listed = ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in changes)
        raise ConfigError(
            f"--resume: the run in {output_dir} was trained with other settings: {listed}; resume with the saved "
            f"values ({saved_path}), or start a new run in another train.output_dir (or with --overwrite)"
        )


# ----------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (see configs/); overrides: --section.key value")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the latest checkpoint in train.output_dir, or from a given folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="clear train.output_dir first (only the files denselm wrote there; refused otherwise)")


def run(args) -> int:
    cfg = load_config(args.config, list(args.overrides))
    try:
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingError as err:
        logger.error("%s", err)
        return 3
    return 0
