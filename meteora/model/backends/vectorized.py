"""The `torch` backend: the mixture-of-LoRA delta in a few vectorized ops, with no loop over tokens.

    delta[t] = sum_j weights[t, j] * scaling[e] * B_e (A_e x[t]),  e = ids[t, j]

Two steps (symbols: meteora/model/experts.py):
  shrink  h[t, j, c] = A_e[c] . x[t] for each picked expert e = ids[t, j]; 0 in slots c >= r_e     [T, k, r_max]
  expand  one F.embedding_bag over the rows of B_t: token t's bag holds the rows of its k experts,
          each row (scaling folded in) weighted by weights[t, j] * h[t, j, c]. It reads only the picked
          experts' rows, copies no weights per token, and needs no padding in storage (padded slots point
          at the zero row R of B_t).
Three forms, picked per call by size (the fewest ops for the size: at decode a call is a handful of small ops,
and their count, not arithmetic, is the cost on a CPU):
  gathered  fewest tokens, when the picked rows are under half of A's: copy just those rows of A, one
            batched mat-vec, then the expand.
  dense     few tokens (decode at batch 8): all experts at once, with no expand bag: x @ A^T in one GEMM, each
            row times its expert's routing weight (0 unless picked), @ B_t in a second GEMM. The work is R per
            token instead of k * r, which is nothing at these sizes; it is 1.7x faster than gathering the
            picked columns into the bag (one layer, 8 tokens, 12 experts).
  grouped   many tokens (prefill): token slots sorted by expert, one GEMM per expert over its contiguous
            segment, so each expert's A is read once per call and the work is k * r per token, not R.
Numerics: all arithmetic is fp32 (shrink, weighting and expand accumulate in fp32 and the delta is returned in
fp32; the layer casts it to the base dtype once). fp16 / bf16 experts are upcast as they are read: the picked
rows in the gathered form, the whole stack otherwise (a no-op for the fp32 models this backend serves on CPU;
CUDA inference uses the Triton kernels, which upcast each tile after loading it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..experts import ExpertStack

# Dense shrink while T * R stays under this (about T <= 73 for 28 experts of rank 8): below it one GEMM over
# all experts beats a GEMM per expert; above it the grouped form's k * r work per token wins.
DENSE_SHRINK_MAX = 16384


def vectorized_delta(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertStack) -> torch.Tensor:
    """x [T, d_in], ids [T, k] int64, weights [T, k] fp32 -> delta [T, d_out] fp32."""
    T, k = ids.shape
    x = x.float()
    if T == 0:
        return x.new_zeros(0, experts.B_t.shape[1])
    if 2 * T * k * experts.r_max > experts.total_rank and T * experts.total_rank <= DENSE_SHRINK_MAX:
        return _dense_delta(x, ids, weights, experts)
    rows = experts.row_table.index_select(0, ids.reshape(-1)).view(T, -1)  # [T, k * r_max]; R where padded
    if 2 * rows.numel() <= experts.total_rank:
        picked_A = experts.A.index_select(0, rows.view(-1)).float().view(T, -1, x.shape[1])  # [T, k * r_max, d_in]
        h = torch.bmm(picked_A, x.unsqueeze(-1))  # [T, k * r_max, 1]
    else:
        h = _grouped_shrink(x, ids, experts)
    per_row = (h.view(T, k, -1) * weights.unsqueeze(-1)).view(T, -1)  # [T, k * r_max]
    return F.embedding_bag(rows, experts.B_t.float(), per_sample_weights=per_row, mode="sum")  # [T, d_out]


def _dense_delta(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertStack) -> torch.Tensor:
    """Every expert's rows, each weighted by its expert's routing weight (0 where not picked): two GEMMs."""
    per_expert = x.new_zeros(x.shape[0], experts.num_experts).scatter_add_(1, ids, weights)  # [T, E]; a repeated id sums
    h = F.linear(x, experts.A.float()) * per_expert.index_select(1, experts.row_expert)  # [T, R + 1]
    return h @ experts.B_t.float()  # [T, d_out]


def _grouped_shrink(x: torch.Tensor, ids: torch.Tensor, experts: ExpertStack) -> torch.Tensor:
    T, k = ids.shape
    flat = ids.reshape(-1)  # [T * k] expert of each (token, slot)
    order = flat.argsort(stable=True)  # slots grouped by expert
    counts = torch.bincount(flat, minlength=experts.num_experts).tolist()
    x_sorted = x.index_select(0, order // k)  # [T * k, d_in]
    h_sorted = x.new_zeros(T * k, experts.r_max)  # [T * k, r_max]
    start = 0
    for e, count in enumerate(counts):
        rank = experts.rank_list[e]
        if count and rank:
            A_e, _ = experts.expert(e)  # [r_e, d_in]
            h_sorted[start : start + count, :rank] = x_sorted[start : start + count] @ A_e.float().t()
        start += count
    return torch.empty_like(h_sorted).index_copy_(0, order, h_sorted)  # [T * k, r_max] in (token, slot) order
