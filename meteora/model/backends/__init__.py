"""Backends compute the experts' delta of one layer from the routing: (x, ids, weights, experts) -> delta.

Each is a function in its own file; this table is the only dispatch. "auto" is resolved at every call from
where the activations are: for CPU inference the fused call of fused_cpu.py (routing and delta in one native
call; the layer tries it first), the Triton kernels on CUDA (when triton is installed and no gradient is
needed), the vectorized torch backend otherwise (training, forced or teacher routing).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..experts import ExpertStack
from .loop import loop_delta
from .triton_backend import triton_available, triton_delta
from .vectorized import vectorized_delta

DeltaFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ExpertStack], torch.Tensor]

BACKENDS: dict[str, DeltaFn] = {"loop": loop_delta, "torch": vectorized_delta, "triton": triton_delta}


def check_backend(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {sorted(BACKENDS)} or 'auto'")
    return name


def pick_backend(name: str, x: torch.Tensor, needs_grad: bool) -> DeltaFn:
    """The delta function for backend `name` applied to activations `x`, where the fused CPU call does not apply
    (under "auto" the layer tries fused_cpu.py first)."""
    if name == "auto":
        name = "triton" if x.is_cuda and not needs_grad and triton_available() else "torch"
    return BACKENDS[name]
