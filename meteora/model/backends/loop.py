"""The `loop` backend: the reference. One expert at a time, only the tokens that picked it; plainly correct.

    delta[t] = sum_j weights[t, j] * scaling[e] * B_e (A_e x[t]),  e = ids[t, j]
"""
from __future__ import annotations

import torch

from ..experts import ExpertStack


def loop_delta(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertStack) -> torch.Tensor:
    """x [T, d_in], ids [T, k] int64, weights [T, k] fp32 -> delta [T, d_out] fp32."""
    delta = x.new_zeros(x.shape[0], experts.B_t.shape[1], dtype=torch.float32)
    for e in range(experts.num_experts):
        if experts.rank_list[e] == 0:  # this expert doesn't target this layer: it contributes nothing
            continue
        tokens, slots = (ids == e).nonzero(as_tuple=True)  # [n], [n]: the (token, slot) pairs that picked e
        if tokens.numel() == 0:
            continue
        A_e, B_e_t = experts.expert(e)  # [r_e, d_in], scaling_e * B_e^T [r_e, d_out]
        h = x[tokens].float() @ A_e.float().t()  # [n, r_e]
        delta.index_add_(0, tokens, (h @ B_e_t.float()) * weights[tokens, slots, None])  # [n, d_out] per token
    return delta
