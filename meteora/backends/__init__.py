"""Backends compute the experts' delta of one layer from the routing: (x, ids, weights, experts) -> delta.

Each is a function in its own file; this table is the only dispatch. "auto" picks the fastest one that runs
where the model is. The Triton backend (GPU) joins this table from kernels/.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..experts import ExpertStack
from .loop import loop_delta
from .vectorized import vectorized_delta

DeltaFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ExpertStack], torch.Tensor]

BACKENDS: dict[str, DeltaFn] = {"loop": loop_delta, "torch": vectorized_delta}


def resolve_backend(name: str) -> str:
    """The backend to use for `name`: "auto" or one of BACKENDS."""
    if name == "auto":
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {sorted(BACKENDS)} or 'auto'")
    return name
