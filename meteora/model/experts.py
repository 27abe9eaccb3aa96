"""ExpertStack: every expert's LoRA factors for one adapted linear layer, stacked at their own ranks.

Glossary (used by the layer and the backends too):
    T tokens, d_in / d_out the layer's sizes, E experts, k experts picked per token,
    r_e the rank of expert e here (0 when e does not target this layer), R = sum_e r_e, r_max = max_e r_e.

Storage, with no padding and no per-token copies:
    A        [R + 1, d_in]   rows offsets[e] : offsets[e] + r_e are expert e's lora_A; the last row is zero
    B_t      [R + 1, d_out]  the same rows of scaling_e * lora_B transposed (the scaling folded in once, so no
                             backend spends an op on it); the last row is zero
    row_table [E, r_max]     row_table[e, c] = offsets[e] + c for c < r_e, else R (a zero row): indexing it
                             with a token's expert ids gives the rows of its experts, padded slots included
    row_expert [R + 1]       the expert each row belongs to (0 for the zero row)
    offsets [E] int64 (first row of each expert), ranks [E] int64, scaling [E] fp32 (alpha / r or alpha / sqrt(r);
    0 where r_e = 0)
"""
from __future__ import annotations

import torch
from torch import nn

from .adapters import LoraModule


class ExpertStack(nn.Module):
    def __init__(self, A: torch.Tensor, B_t: torch.Tensor, ranks: torch.Tensor, scaling: torch.Tensor):
        super().__init__()
        R = int(ranks.sum())
        assert A.shape[0] == R + 1 and B_t.shape[0] == R + 1, "stacked rows must match the ranks, plus a zero row"
        offsets = torch.cumsum(ranks, 0) - ranks
        slot = torch.arange(int(ranks.max()))
        row_table = torch.where(slot < ranks[:, None], offsets[:, None] + slot, R)  # [E, r_max]
        row_expert = torch.cat([torch.repeat_interleave(torch.arange(len(ranks)), ranks), torch.zeros(1, dtype=torch.int64)])
        # Buffers, not parameters: experts never train. Not persistent: the checkpoint saves them itself.
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B_t", B_t, persistent=False)
        self.register_buffer("row_table", row_table, persistent=False)
        self.register_buffer("row_expert", row_expert, persistent=False)
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("ranks", ranks, persistent=False)
        self.register_buffer("scaling", scaling.float(), persistent=False)
        self.rank_list = ranks.tolist()  # python ints: the loop backend and grouped shrink index without syncs
        self.offset_list = offsets.tolist()
        self.r_max = row_table.shape[1]
        self.total_rank = R

    @classmethod
    def from_modules(cls, modules: list[LoraModule | None], dtype: torch.dtype) -> "ExpertStack":
        """Stack one layer's factors of each expert, in expert order (None: that expert doesn't target it)."""
        present = [m for m in modules if m is not None]
        d_out = present[0].B.shape[0]
        ranks = torch.tensor([m.rank if m else 0 for m in modules], dtype=torch.int64)
        scaling = torch.tensor([m.scaling if m else 0.0 for m in modules], dtype=torch.float32)
        zero_rows = torch.zeros(1, present[0].A.shape[1], dtype=dtype), torch.zeros(1, d_out, dtype=dtype)
        A = torch.cat([m.A.to(dtype) for m in present] + [zero_rows[0]])  # [R + 1, d_in]
        # scaled in fp32 and rounded once to `dtype` (a bf16 adapter in an fp32 base keeps its exact product)
        B_t = torch.cat([(m.B.float().t() * m.scaling).to(dtype) for m in present] + [zero_rows[1]])  # [R + 1, d_out]
        return cls(A, B_t, ranks, scaling)

    @classmethod
    def from_stacked(cls, A: torch.Tensor, B_t: torch.Tensor, ranks: torch.Tensor, scaling: torch.Tensor) -> "ExpertStack":
        """Rebuild from checkpoint tensors: A [R, d_in], B_t [R, d_out] (scaled, no zero rows), ranks, scaling [E]."""
        A = torch.cat([A, A.new_zeros(1, A.shape[1])])
        B_t = torch.cat([B_t, B_t.new_zeros(1, B_t.shape[1])])
        return cls(A, B_t, ranks.to(torch.int64), scaling)

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (A_e [r_e, d_in], scaling_e * B_e^T [r_e, d_out]) as views into the stack."""
        start, stop = self.offset_list[e], self.offset_list[e] + self.rank_list[e]
        return self.A[start:stop], self.B_t[start:stop]

    def stacked(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores (without the zero rows)."""
        return {"A": self.A[:-1], "B_t": self.B_t[:-1], "ranks": self.ranks, "scaling": self.scaling}

    @property
    def num_experts(self) -> int:
        return len(self.rank_list)
