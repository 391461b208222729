"""LoRA layers that add their update into the frozen layer's output in place.

peft's ``lora.Linear.forward`` with bf16 frozen weights and float32 adapters (the recipe
that keeps AdamW's state in float32) runs, per adapted linear layer and token:

    result = base(x)                                  # (T, out) bf16
    result = result + lora_B(lora_A(x.float())) * s   # a (T, out) float32 product, then a float32 sum
    result = result.to(bfloat16)                      # and a copy back

three element-wise passes over a (T, out) float32 tensor (and their three in backward), for a
rank-r update whose matrix multiplies are tiny.  Here the update is added into ``result`` in
place, ``result.add_(lora_B(lora_A(x.float())), alpha=s)``: one pass that computes in float32
and rounds to the output dtype once, as peft's sum does.  Measured on a cached demo step
(4 adapted SmolLM2 blocks, 32 queries x 2 passages, bf16 weights, float32 LoRA r16):
benchmarks/RESULTS.md.

Numbers: ``base + s * update`` is evaluated in float32 and rounded once, as in peft; when the
scaling ``s = lora_alpha / r`` is a power of two (1 with peft's defaults, 2 with the common
``lora_alpha = 2 r``, the demo's) the result and the gradients are bit-identical to peft's
(tested), otherwise they may differ by one float32 rounding of the product before the final
rounding.

Only the plain case takes this path: a peft ``lora.Linear`` around an ``nn.Linear``, one active
adapter, no variant (DoRA and the like), no dropout, not merged, adapters enabled, no extra
arguments.  Everything else runs peft's own forward.  Scoped like the other speed-ups
(``fast_lora(backbone)``): the modules get their class's forward back on exit.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .common import swapped_forwards


def _lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # peft is a dependency, but the encoder works on plain models too
        return None
    return Linear


def _plain_adapter(module: nn.Module) -> str | None:
    """The one active adapter's name when ``module`` can take the in-place path now, else None."""
    try:
        if module.disable_adapters or module.merged or not isinstance(module.base_layer, nn.Linear):
            return None
    except AttributeError:  # a peft version whose layer looks different: its own forward
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or not isinstance(module.lora_dropout[name], nn.Identity):
        return None
    if getattr(module, "use_dora", {}).get(name, False):
        return None
    return name


def _in_place(module: nn.Module):
    peft_forward = type(module).forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = _plain_adapter(module) if not args and not kwargs else None
        if name is None:
            return peft_forward(module, x, *args, **kwargs)
        result = module.base_layer(x)  # (..., out), the frozen weights' dtype
        lora_A, lora_B = module.lora_A[name], module.lora_B[name]
        x = module._cast_input_dtype(x, lora_A.weight.dtype) if hasattr(module, "_cast_input_dtype") else x.to(lora_A.weight.dtype)
        update = lora_B(lora_A(x))  # (..., out), the adapters' dtype
        # F.linear's output is not saved for its backward, so adding in place is safe for autograd
        return result.add_(update, alpha=module.scaling[name])

    return forward


def lora_layers(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's peft LoRA linear layers."""
    cls = _lora_linear_class()
    if cls is None:
        return []
    return [m for m in backbone.modules() if type(m) is cls]


@contextlib.contextmanager
def fast_lora(backbone: nn.Module) -> Iterator[None]:
    """Within the context every plain peft LoRA linear layer of ``backbone`` adds its update in place."""
    layers = lora_layers(backbone)
    if not layers:
        yield
        return
    with swapped_forwards({m: _in_place(m) for m in layers}):
        yield
