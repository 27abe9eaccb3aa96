"""Fused mixture-of-LoRA Triton kernels: the delta of top-k routed LoRA experts stored at their own ranks.

Semantics:
    for t in range(T):
        for j in range(k):
            e = ids[t, j]; rows = slice(offsets[e], offsets[e] + ranks[e])
            out[t] += weights[t, j] * B_t[rows].T @ (A[rows] @ x[t])       # fp32 accumulation

Arguments (all on one device):
    x        [T, d_in]     fp32 | fp16 | bf16, last dim contiguous
    ids      [T, k]        int64 expert of each pick
    weights  [T, k]        fp32 routing weight of each pick
    A        [R', d_in]    every expert's lora_A rows, stacked at their own ranks (R' >= sum of ranks)
    B_t      [R', d_out]   every expert's (scaling * lora_B)^T rows, in the same order, same dtype as A
    ranks    [E] int64     rank of each expert (0: the expert contributes nothing)
    offsets  [E] int64     first row of each expert in A and B_t
    r_max    int           max(ranks), passed from the host so no call syncs the device
    out      [T, d_out]    optional; written, never read (defaults to a new tensor of x's dtype)

Two regimes (kernels/configs.py): up to DECODE_MAX_TOKENS tokens, per-token gathered kernels (gathered.py);
above, kernels over blocks of slots grouped by expert, each expert's tile read once per block (grouped.py).
"""
from __future__ import annotations

import torch

from .configs import DECODE_MAX_TOKENS
from .gathered import gathered_delta
from .grouped import grouped_delta

__all__ = ["DECODE_MAX_TOKENS", "gathered_delta", "grouped_delta", "mixture_lora_delta"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def mixture_lora_delta(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, A: torch.Tensor,
                       B_t: torch.Tensor, ranks: torch.Tensor, offsets: torch.Tensor, r_max: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """out [T, d_out] = the routed experts' delta. See the module docstring for shapes and semantics."""
    _check(x, ids, weights, A, B_t, ranks, offsets, out)
    T = x.shape[0]
    if out is None:
        out = torch.empty(T, B_t.shape[1], dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    if r_max == 0:
        return out.zero_()
    x = x.to(A.dtype)
    delta = gathered_delta if T <= DECODE_MAX_TOKENS else grouped_delta
    return delta(x, ids.contiguous(), weights.float().contiguous(), A, B_t, ranks, offsets, r_max, out)


def _check(x, ids, weights, A, B_t, ranks, offsets, out) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [T, d_in] with a contiguous last dim, got shape {list(x.shape)}")
    if x.dtype not in DTYPES or A.dtype not in DTYPES or B_t.dtype != A.dtype:
        raise ValueError(f"dtypes: x {x.dtype}, A {A.dtype}, B_t {B_t.dtype}; A and B_t must match, all in {DTYPES}")
    if ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"ids {list(ids.shape)} and weights {list(weights.shape)} must both be [T={x.shape[0]}, k]")
    if A.shape[1] != x.shape[1] or A.shape[0] != B_t.shape[0] or not (A.is_contiguous() and B_t.is_contiguous()):
        raise ValueError(f"A {list(A.shape)} / B_t {list(B_t.shape)} must be contiguous [R, d_in] / [R, d_out]")
    if ranks.shape != offsets.shape or ranks.dim() != 1:
        raise ValueError(f"ranks {list(ranks.shape)} and offsets {list(offsets.shape)} must both be [E]")
    if out is not None and (out.shape != (x.shape[0], B_t.shape[1]) or out.stride(1) != 1 or out.stride(0) != out.shape[1]):
        raise ValueError(f"out must be a contiguous [T={x.shape[0]}, d_out={B_t.shape[1]}], got shape {list(out.shape)}")
    devices = {str(t.device) for t in (x, ids, weights, A, B_t, ranks, offsets, out) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(devices)}")
