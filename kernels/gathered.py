"""Decode regime: per-token mixture-of-LoRA kernels (BGMV-like), no routing metadata to build.

With few tokens every token has its own experts, and sorting slots by expert would cost more launches than
it saves (routing differs at every layer). Each program gathers its token's expert rows directly:
    shrink  program (slot s = t * k + j, rank tile):  h[s, c] = weights[s] * A[off_e + c] . x[t]     c < r_e
    expand  program (token t, output tile):           out[t, n] = sum_j sum_{c < r_e} h[t*k+j, c] * B_t[off_e + c, n]
Both accumulate in fp32; h is fp32. Experts of rank 0 add nothing; every out element is written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import DECODE, block_r


@triton.jit
def _shrink_kernel(x_ptr, ids_ptr, weights_ptr, a_ptr, ranks_ptr, offsets_ptr, h_ptr,
                   d_in, x_d0_stride, a_d0_stride, h_d0_stride,
                   K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    slot = tl.program_id(0)
    r_tile = tl.program_id(1)
    expert = tl.load(ids_ptr + slot)
    rank = tl.load(ranks_ptr + expert)
    if r_tile * BLOCK_R < rank:
        first_row = tl.load(offsets_ptr + expert)
        rows = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        row_ok = rows < rank
        x_row = x_ptr + (slot // K) * x_d0_stride
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            col_ok = cols < d_in
            x = tl.load(x_row + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            a = tl.load(a_ptr + (first_row + rows)[:, None] * a_d0_stride + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_K]
            acc += tl.sum(a * x[None, :], axis=1)
        weight = tl.load(weights_ptr + slot)
        tl.store(h_ptr + slot * h_d0_stride + rows, acc * weight, mask=row_ok)


@triton.jit
def _expand_kernel(h_ptr, ids_ptr, b_ptr, ranks_ptr, offsets_ptr, out_ptr,
                   d_out, h_d0_stride, b_d0_stride, out_d0_stride,
                   K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_ok = cols < d_out
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(K):
        slot = token * K + j
        expert = tl.load(ids_ptr + slot)
        rank = tl.load(ranks_ptr + expert)
        first_row = tl.load(offsets_ptr + expert)
        for r0 in range(0, rank, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
            row_ok = rows < rank
            h = tl.load(h_ptr + slot * h_d0_stride + rows, mask=row_ok, other=0.0)  # [BLOCK_R] fp32
            b = tl.load(b_ptr + (first_row + rows)[:, None] * b_d0_stride + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_N]
            acc += tl.sum(h[:, None] * b, axis=0)
    tl.store(out_ptr + token * out_d0_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def gathered_delta(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, A: torch.Tensor, B_t: torch.Tensor,
                   ranks: torch.Tensor, offsets: torch.Tensor, r_max: int, out: torch.Tensor) -> torch.Tensor:
    """Write the mixture delta of each token into out [T, d_out]. Shapes: kernels/__init__.py."""
    T, k = ids.shape
    BLOCK_R = block_r(r_max)
    h = torch.empty(T * k, max(r_max, 1), dtype=torch.float32, device=x.device)  # [S, r_max], rows < r_e written
    _shrink_kernel[(T * k, triton.cdiv(r_max, BLOCK_R))](
        x, ids, weights, A, ranks, offsets, h, x.shape[1], x.stride(0), A.stride(0), h.stride(0),
        K=k, BLOCK_R=BLOCK_R, BLOCK_K=DECODE["BLOCK_K"], num_warps=DECODE["num_warps"])
    _expand_kernel[(T, triton.cdiv(out.shape[1], DECODE["BLOCK_N"]))](
        h, ids, B_t, ranks, offsets, out, out.shape[1], h.stride(0), B_t.stride(0), out.stride(0),
        K=k, BLOCK_R=BLOCK_R, BLOCK_N=DECODE["BLOCK_N"], num_warps=DECODE["num_warps"])
    return out
