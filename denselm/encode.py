"""`denselm encode`: a JSONL corpus (or queries) -> a folder of embedding shards, resumable and multi-GPU.

    denselm encode --model out/model --input corpus.jsonl --output emb/corpus
    denselm encode --model out/model --input queries.jsonl --output emb/queries --kind queries
    torchrun --nproc_per_node 8 -m denselm.cli encode --model ... --input ... --output ...
    # (or: torchrun --nproc_per_node 8 --no-python denselm encode ...)

Input: BEIR-style JSONL, one object a line with ``_id`` and ``text`` (+ optional ``title``
for a corpus: encoded as ``"title text"``, see ``denselm.beir.format_document``).

Output (the format of ``denselm.embeddings``; read with ``load_embeddings``): ``shard-00000.npy`` + ``shard-00000.ids.json``
per ``--shard-size`` rows in input order, ``encode_plan.json`` (what this folder is an encoding
of), and ``manifest.json``, written last, which marks the folder complete.

Resume: every shard is written atomically, so after a crash (or Ctrl-C) rerunning the same
command computes only the missing shards. The plan file makes a rerun with a different model,
spec, input, kind, instruction or shard size fail instead of mixing two encodings in one folder.
Identity is by content, not path (``denselm.outputs``): the model by every file's size and the
SHA-256 of its first and last MiB (``model_sha256``), the input by the SHA-256 of the (id, text)
pairs encoded (``input_sha256``), the spec by its values (template, instruction, max lengths,
passage prefix, query cut, preset, the weights' dtype and the output dtype). A moved or copied model or input still resumes; a retrained one
does not.

Several processes (``WORLD_SIZE`` > 1, from torchrun): shard ``i`` belongs to rank
``i % world_size``; no collectives except one barrier before rank 0 writes the manifest.
Each shard's numbers do not depend on the world size (batches never cross shards).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from denselm.errors import DataError, InputNotFound, UserError

logger = logging.getLogger(__name__)

PLAN_NAME = "encode_plan.json"
KINDS = ("corpus", "queries")
PATH_KEYS = ("model", "input")
"""Plan keys kept for the reader only: the folder is identified by content (the ``*_sha256`` keys)."""
_HASH_LABELS = {"model_sha256": "the model's files (--model)", "input_sha256": "the input texts (--input)",
                "ids_sha256": "the input ids (--input)"}


@dataclass
class EncodeResult:
    """What one ``encode_to_folder`` call did (this process's share under torchrun)."""

    num_shards: int
    computed: list[int] = field(default_factory=list)
    """Shards this process encoded in this call."""
    skipped: list[int] = field(default_factory=list)
    """Shards this process found already complete (resume)."""
    complete: bool = False
    """The manifest was written (by rank 0) and the folder is complete."""


# ------------------------------------------------------------------------------------ input


def read_texts(path: str | os.PathLike, kind: str = "corpus") -> tuple[list[str], list[str]]:
    """(ids, texts) of a BEIR-style JSONL file; errors name file, line and field.

    A corpus line's ``title`` is joined to its text as ``denselm.beir.format_document`` does (the
    same text ``denselm evaluate`` encodes). Duplicate ids and an empty file are errors.
    """
    from denselm.beir import read_corpus, read_queries

    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"--input {path}: no such file")
    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    ids, texts = read_corpus(path) if kind == "corpus" else read_queries(path)
    if not ids:
        raise DataError(f"{path}: empty input (no lines with '_id' and 'text')")
    return ids, texts


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 over the ids in order: cheap identity of an input for the plan file."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def shard_ranges(n: int, shard_size: int) -> list[range]:
    """Row ranges of the shards: [0, s), [s, 2s), ..., the last one possibly shorter."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    return [range(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def owned_shards(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Round-robin: rank r encodes shards r, r + W, r + 2W, ..."""
    return list(range(rank, num_shards, world_size))


# ------------------------------------------------------------------------------------ plan


def _check_plan(folder: Path, plan: dict) -> bool:
    """Refuse a folder that holds (part of) a different encoding; nothing is written here.

    Returns True when an old plan exists but no shard was written under it: it may be replaced.
    """
    from denselm.embeddings import EMBEDDINGS_MANIFEST, list_shards
    from denselm.io import read_json

    plan_path = folder / PLAN_NAME
    if plan_path.is_file():
        old = read_json(plan_path, "encode plan; delete the folder to start over")
        # keys an older plan lacks are not compared (it was written before denselm recorded them)
        diffs = [k for k in plan if k not in PATH_KEYS and k in old and old[k] != plan[k]]
        if diffs and not list_shards(folder) and not (folder / EMBEDDINGS_MANIFEST).exists():
            logger.info("%s: no shard written yet; replacing its plan (%s changed)", folder, ", ".join(diffs))
            return True
        if diffs:
            detail = "; ".join(f"{_HASH_LABELS[k]} differ" if k in _HASH_LABELS else f"{k}: {old.get(k)!r} -> {plan[k]!r}"
                               for k in diffs[:4])
            raise UserError(
                f"--output {folder} holds an encoding with other settings ({detail}); "
                "use another --output or delete that folder"
            )
    elif folder.is_dir() and (list_shards(folder) or (folder / EMBEDDINGS_MANIFEST).exists()):
        raise UserError(
            f"--output {folder} holds embedding files without {PLAN_NAME} (not written by denselm encode "
            "or by an older version); use another --output or delete that folder"
        )
    return False


def _check_shard_ids(folder: Path, index: int, expected: list[str]) -> None:
    """An existing shard must hold exactly the ids this plan puts in it."""
    from denselm.embeddings import shard_paths

    ids_path = shard_paths(folder, index)[1]
    try:
        found = json.loads(ids_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        found = None
    if found != expected:
        raise DataError(
            f"{ids_path}: does not hold the ids of rows {index}*shard_size.. of the input "
            "(the folder was changed by hand?); delete the shard to recompute it"
        )


# ------------------------------------------------------------------------------------ encode


def encode_to_folder(
    encoder,
    ids: Sequence[str],
    texts: Sequence[str],
    output: str | os.PathLike,
    *,
    kind: str = "corpus",
    shard_size: int = 100_000,
    instruction: str | None = None,
    batch_size: int | None = None,
    info: dict | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier=None,
    show_progress: bool = True,
) -> EncodeResult:
    """Encode ``texts`` into shards under ``output``; this process does shards ``i % world_size == rank``.

    ``info``: identity of the run (model, input, ...) stored in the plan and the manifest; a rerun
    with different ``info`` or settings is refused (unless no shard was written under the old plan).
    ``barrier`` (``torch.distributed.barrier`` under torchrun): after rank 0 wrote the plan, after
    every rank's shards, after rank 0 wrote the manifest. Missing shards only are computed.
    """
    import numpy as np

    from denselm.embeddings import EMBEDDINGS_MANIFEST, list_shards, save_embedding_shard, write_embedding_manifest
    from denselm.io import atomic_write, fault_point, remove_stale_temps

    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if len(ids) != len(texts):
        raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
    if not ids:
        raise DataError("nothing to encode: the input is empty")
    if len(set(ids)) != len(ids):
        raise DataError("duplicate ids in the input")
    folder = Path(output)
    ranges = shard_ranges(len(ids), shard_size)
    plan = {
        "kind": kind,
        "count": len(ids),
        "ids_sha256": ids_digest(ids),
        "shard_size": shard_size,
        "num_shards": len(ranges),
        "instruction": instruction if kind == "queries" else None,
        "output_dtype": np.dtype(getattr(encoder, "output_dtype", np.float32)).name,
        **(info or {}),
    }
    stale_plan = _check_plan(folder, plan)  # every rank checks the same files: they all fail or all pass
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)  # half-written shards of a killed run
        if stale_plan:
            (folder / PLAN_NAME).unlink()
        # A complete folder being recomputed (a shard was deleted) must not look complete meanwhile.
        existing = set(list_shards(folder)) if folder.is_dir() else set()
        if (folder / EMBEDDINGS_MANIFEST).exists() and existing != set(range(len(ranges))):
            (folder / EMBEDDINGS_MANIFEST).unlink()
        if not (folder / PLAN_NAME).exists():
            atomic_write(folder / PLAN_NAME, json.dumps(plan, indent=2))
    if barrier is not None:
        barrier()  # the plan exists before anyone writes a shard

    result = EncodeResult(num_shards=len(ranges))
    done = set(list_shards(folder))
    mine = owned_shards(len(ranges), rank, world_size)
    todo = [i for i in mine if i not in done]
    for i in mine:
        if i in done:
            _check_shard_ids(folder, i, list(ids[ranges[i].start : ranges[i].stop]))
            result.skipped.append(i)
    if result.skipped:
        logger.info("rank %d: %d of its %d shards already complete; encoding %d", rank, len(result.skipped), len(mine), len(todo))
    progress = None
    if show_progress and todo:
        from tqdm.auto import tqdm

        total = sum(len(ranges[i]) for i in todo)
        desc = f"encode {kind}" + (f" (rank {rank})" if world_size > 1 else "")
        progress = tqdm(total=total, desc=desc, unit="text", position=rank if world_size > 1 else None)
        encoder.on_batch = progress.update  # advance per batch: a 100k-row shard is minutes of work
    try:
        for i in todo:
            rows = ranges[i]
            shard_texts = list(texts[rows.start : rows.stop])
            if kind == "queries":
                emb = encoder.encode_queries(shard_texts, instruction=instruction, batch_size=batch_size)
            else:
                emb = encoder.encode_corpus(shard_texts, batch_size=batch_size)
            save_embedding_shard(folder, i, list(ids[rows.start : rows.stop]), emb)
            result.computed.append(i)
            fault_point("encode.shard")
    finally:
        if progress is not None:
            encoder.on_batch = None
            progress.close()

    if barrier is not None:
        barrier()  # every rank's shards are on disk
    if rank == 0:
        missing = sorted(set(range(len(ranges))) - set(list_shards(folder)))
        if missing:  # only possible if files vanished under us
            raise RuntimeError(f"{folder}: shards {missing[:5]} missing after encoding; rerun to resume")
        manifest_info = {k: v for k, v in plan.items() if k not in ("count", "num_shards")}
        write_embedding_manifest(folder, manifest_info)
        result.complete = True
    if barrier is not None:
        barrier()  # nobody returns before the folder is complete
        result.complete = True
    return result


# ------------------------------------------------------------------------------------ CLI


def add_encoder_arguments(parser) -> None:
    """Flags shared by the commands that load a denselm model (encode, mine)."""
    from denselm.spec import PRESETS

    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="template preset for a plain transformers folder without denselm.json")
    parser.add_argument("--base-model", default=None, help="base model folder of a LoRA adapter (default: the manifest's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model weights' dtype (default auto: bfloat16 on GPU and on CPUs with bf16 matrix "
                             "units (AMX/AVX512-BF16), else float32; on such a CPU bf16 kept the demo model's pyfaq "
                             "nDCG@10 within 0.003 of float32 and encoded 2.3x faster)")
    parser.add_argument("--batch-size", type=int, default=64, help="most texts per forward pass (default 64)")
    parser.add_argument("--max-tokens", type=int, default=16384,
                        help="most padded tokens per forward pass; batches are sorted by length (default 16384)")
    parser.add_argument("--padding-side", default="right", choices=["left", "right"],
                        help="padding side of encoder batches (results do not depend on it)")


def load_encoder_from_args(args, output_dtype: str = "float32", device: str | None = None):
    """``denselm.inference.load_encoder`` with the shared flags checked (errors name the flag)."""
    from denselm.inference import load_encoder

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    model = Path(args.model)
    if not model.is_dir():
        raise InputNotFound(f"--model {model}: no such folder")
    try:
        return load_encoder(
            model, device=device or args.device, preset=args.preset, dtype=args.dtype, base_model=args.base_model,
            show_progress=False, batch_size=args.batch_size, max_tokens=args.max_tokens,
            padding_side=args.padding_side, output_dtype=output_dtype,
        )
    except UserError as err:
        raise type(err)(f"--model {model}: {err}") from None


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="denselm output folder (LoRA or merged), or a plain folder with --preset")
    parser.add_argument("--input", required=True, help="JSONL with _id, text (+ title): a BEIR corpus.jsonl or queries.jsonl")
    parser.add_argument("--output", required=True, help="folder for the shards and manifest.json")
    parser.add_argument("--kind", default="corpus", choices=KINDS,
                        help="corpus: passages (title + text); queries: formatted with the instruction (default corpus)")
    parser.add_argument("--instruction", default=None,
                        help="query instruction (--kind queries; default: the one in the model's manifest)")
    parser.add_argument("--shard-size", type=int, default=100_000,
                        help="rows per shard file, the unit of resume and of the split across ranks (default 100000)")
    parser.add_argument("--fp16", action="store_true", help="store embeddings as float16 (half the disk)")
    add_encoder_arguments(parser)


def run(args) -> int:
    from denselm import distributed
    from denselm.io import check_writable
    from denselm.outputs import fingerprint_folder, fingerprint_texts

    if args.shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.instruction is not None and args.kind != "queries":
        raise UserError("--instruction applies to --kind queries only")
    ids, texts = read_texts(args.input, args.kind)  # validate the input before loading a model
    check_writable(args.output)

    info = distributed.init_from_env()
    device = args.device
    if device is None and info.world_size > 1:
        import torch

        device = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        encoder = load_encoder_from_args(args, output_dtype="float16" if args.fp16 else "float32", device=device)
        encoder.show_progress = False
        run_info = {
            "model": str(Path(args.model).resolve()),
            "model_sha256": fingerprint_folder(args.model),
            "preset": args.preset,
            "input": str(Path(args.input).resolve()),
            "input_sha256": fingerprint_texts(ids, texts),
            "template": encoder.template,
            "query_max_len": encoder.query_max_len,
            "passage_max_len": encoder.passage_max_len,
            "passage_prefix": encoder.passage_prefix if args.kind == "corpus" else None,
            # the weights' dtype decides the numbers (--dtype auto differs by machine): a resume must match it
            "weights_dtype": str(next(encoder.model.parameters()).dtype).removeprefix("torch."),
            "query_cut": encoder.spec.query_cut if args.kind == "queries" else None,
        }
        instruction = args.instruction
        if args.kind == "queries" and instruction is None:
            instruction = encoder.prompt  # recorded, so a later run with another instruction is refused
            from denselm.data.templates import get_template

            if instruction is None and get_template(encoder.template).needs_prompt:
                raise UserError(f"template {encoder.template!r} formats queries with an instruction and the model "
                               "has none saved; pass --instruction")
        result = encode_to_folder(
            encoder, ids, texts, args.output, kind=args.kind, shard_size=args.shard_size, instruction=instruction,
            info=run_info, rank=info.rank, world_size=info.world_size,
            barrier=distributed.barrier if info.world_size > 1 else None,
        )
    finally:
        if info.world_size > 1 and distributed.is_initialized():
            import torch.distributed as dist

            dist.destroy_process_group()
    logger.info(
        "rank %d: encoded %d shard(s), %d already done, of %d; %s",
        info.rank, len(result.computed), len(result.skipped), result.num_shards,
        f"complete: {args.output}" if result.complete else "incomplete",
    )
    return 0
