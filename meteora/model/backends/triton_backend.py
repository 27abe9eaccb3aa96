"""The `triton` backend: the fused mixture-of-LoRA kernels of kernels/ (GPU; on CPU only under TRITON_INTERPRET=1).

Inference only: the kernels have no backward, so a call that would need gradients for the gates is refused
rather than silently training nothing. Triton is imported on the first call, never when meteora is imported.
"""
from __future__ import annotations

import os
from functools import cache

import torch

from ..experts import ExpertStack


@cache
def triton_available() -> bool:
    """Whether the kernels can be imported (asked only for CUDA activations, so CPU never imports triton)."""
    try:
        import meteora_moe.kernels  # noqa: F401  (imports triton)
    except ImportError:
        return False
    return True


def triton_delta(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertStack) -> torch.Tensor:
    """x [T, d_in], ids [T, k] int64, weights [T, k] fp32 -> delta [T, d_out] in x's dtype (fp32 accumulation)."""
    if torch.is_grad_enabled() and weights.requires_grad:
        raise RuntimeError("the triton backend is inference-only: train the gates with backend='torch'")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the triton backend needs a CUDA device (or TRITON_INTERPRET=1 to interpret it on CPU)")
    from meteora_moe.kernels import mixture_lora_delta

    return mixture_lora_delta(x, ids, weights, experts.A, experts.B_t, experts.ranks, experts.offsets, experts.r_max)
