"""Prefill regime: grouped mixture-of-LoRA kernels (SGMV / fused_moe-like) over blocks of slots per expert.

Slots are grouped by expert (kernels/expert_blocks.py), so each program loads one expert's A or B tile once
and applies it to up to BLOCK_M slots with tl.dot:
    shrink  program (block, rank tile):    h[s, c] = weights[s] * A[off_e + c] . x[s // k]    for s in block
    expand  program (block, output tile):  out_slots[s, n] = sum_{c < r_e} h[s, c] * B_t[off_e + c, n]
then out[t] = sum_j out_slots[t * k + j] in fp32. Every slot belongs to exactly one block, and blocks of
rank-0 experts write zeros, so every output element is written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import PREFILL, block_r
from .expert_blocks import ExpertBlocks


@triton.jit
def _block_slots(block, sorted_slots_ptr, block_start_ptr, block_end_ptr, BLOCK_M: tl.constexpr):
    """The slots of one block [BLOCK_M] and which of them are real."""
    idx = tl.load(block_start_ptr + block) + tl.arange(0, BLOCK_M)
    ok = idx < tl.load(block_end_ptr + block)
    return tl.load(sorted_slots_ptr + idx, mask=ok, other=0), ok


@triton.jit
def _shrink_kernel(x_ptr, weights_ptr, a_ptr, ranks_ptr, offsets_ptr, h_ptr,
                   sorted_slots_ptr, block_expert_ptr, block_start_ptr, block_end_ptr,
                   d_in, num_experts, x_d0_stride, a_d0_stride, h_d0_stride,
                   K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr):
    block = tl.program_id(0)
    r_tile = tl.program_id(1)
    expert = tl.load(block_expert_ptr + block)
    if expert < num_experts:
        rank = tl.load(ranks_ptr + expert)
        if r_tile * BLOCK_R < rank:
            slots, slot_ok = _block_slots(block, sorted_slots_ptr, block_start_ptr, block_end_ptr, BLOCK_M)
            rows = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
            row_ok = rows < rank
            a_rows = a_ptr + (tl.load(offsets_ptr + expert) + rows) * a_d0_stride  # [BLOCK_R]
            x_rows = x_ptr + (slots // K) * x_d0_stride  # [BLOCK_M]
            acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for k0 in range(0, d_in, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
                col_ok = cols < d_in
                x = tl.load(x_rows[:, None] + cols[None, :], mask=slot_ok[:, None] & col_ok[None, :], other=0.0)
                a = tl.load(a_rows[None, :] + cols[:, None], mask=row_ok[None, :] & col_ok[:, None], other=0.0)
                acc = tl.dot(x, a, acc, input_precision=PRECISION)  # [BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_R]
            weight = tl.load(weights_ptr + slots, mask=slot_ok, other=0.0)  # [BLOCK_M]
            tl.store(h_ptr + slots[:, None] * h_d0_stride + rows[None, :], acc * weight[:, None],
                     mask=slot_ok[:, None] & row_ok[None, :])


@triton.jit
def _expand_kernel(h_ptr, b_ptr, ranks_ptr, offsets_ptr, out_ptr,
                   sorted_slots_ptr, block_expert_ptr, block_start_ptr, block_end_ptr,
                   d_out, num_experts, h_d0_stride, b_d0_stride, out_d0_stride,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < num_experts:
        slots, slot_ok = _block_slots(block, sorted_slots_ptr, block_start_ptr, block_end_ptr, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        col_ok = cols < d_out
        rank = tl.load(ranks_ptr + expert)
        first_row = tl.load(offsets_ptr + expert)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
            row_ok = rows < rank
            h = tl.load(h_ptr + slots[:, None] * h_d0_stride + rows[None, :],
                        mask=slot_ok[:, None] & row_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_R] fp32
            b = tl.load(b_ptr + (first_row + rows)[:, None] * b_d0_stride + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
            # the dot's operands in the experts' dtype (bf16 experts: h rounded to bf16), its sum in fp32
            acc = tl.dot(h.to(b.dtype), b, acc, input_precision=PRECISION)
        tl.store(out_ptr + slots[:, None] * out_d0_stride + cols[None, :], acc,
                 mask=slot_ok[:, None] & col_ok[None, :])


def grouped_delta(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, A: torch.Tensor, B_t: torch.Tensor,
                  ranks: torch.Tensor, offsets: torch.Tensor, r_max: int, out: torch.Tensor) -> torch.Tensor:
    """Write the mixture delta of each token into out [T, d_out]. Shapes: kernels/__init__.py."""
    T, k = ids.shape
    E = ranks.shape[0]
    BLOCK_M, BLOCK_R = PREFILL["BLOCK_M"], block_r(r_max)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 stays fp32 (no silent TF32)
    blocks = ExpertBlocks.make(ids, E, BLOCK_M)
    grid_blocks = blocks.block_expert.shape[0]
    meta = (blocks.sorted_slots, blocks.block_expert, blocks.block_start, blocks.block_end)
    launch = {"num_warps": PREFILL["num_warps"], "num_stages": PREFILL["num_stages"]}
    h = torch.empty(T * k, max(r_max, 1), dtype=torch.float32, device=x.device)  # [S, r_max], rows < r_e written
    _shrink_kernel[(grid_blocks, triton.cdiv(r_max, BLOCK_R))](
        x, weights, A, ranks, offsets, h, *meta, x.shape[1], E, x.stride(0), A.stride(0), h.stride(0),
        K=k, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=PREFILL["BLOCK_K"], PRECISION=precision, **launch)
    d_out = out.shape[1]
    per_slot = torch.empty(T * k, d_out, dtype=torch.float32, device=x.device)  # [S, d_out]
    _expand_kernel[(grid_blocks, triton.cdiv(d_out, PREFILL["BLOCK_N"]))](
        h, B_t, ranks, offsets, per_slot, *meta, d_out, E, h.stride(0), B_t.stride(0), per_slot.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_N=PREFILL["BLOCK_N"], PRECISION=precision, **launch)
    return out.copy_(per_slot.view(T, k, d_out).sum(dim=1))  # fp32 sum over the k picks, one cast
