"""Helpers for equivalence tests: flat gradients and relative error by norm."""

from __future__ import annotations

import torch


def flat_grads(module: torch.nn.Module) -> torch.Tensor:
    parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype) for p in module.parameters() if p.requires_grad]
    return torch.cat(parts)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    denom = b.norm()
    return float((a - b).norm() / denom) if denom > 0 else float((a - b).norm())


def tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5
