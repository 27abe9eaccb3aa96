"""ExpertBlocks: the routing metadata of the grouped kernels, built on the device with no host sync.

Slots (token t, pick j), s = t * k + j, are sorted by expert and cut into blocks of at most BLOCK_M slots
that all use one expert, so a program loads that expert's weights once for the whole block (the SGMV /
fused_moe idea). The grid has a fixed upper bound of cdiv(S, BLOCK_M) + E blocks; unused blocks carry
expert = E and exit at once.

Worked example, ids = [[2, 0], [2, 1], [0, 2]] (T = 3, k = 2, E = 3), BLOCK_M = 2:
    slot experts                     [2, 0, 2, 1, 0, 2]
    sorted_slots (stable, by expert) [1, 4, 3, 0, 2, 5]   expert 0: slots 1, 4 | expert 1: 3 | expert 2: 0, 2, 5
    blocks (expert, start, end)      (0, 0, 2) (1, 2, 3) (2, 3, 5) (2, 5, 6), then (3, ...) padding up to 3 + 3
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton


@dataclass
class ExpertBlocks:
    sorted_slots: torch.Tensor  # [S] int64: slot indices, grouped by expert
    block_expert: torch.Tensor  # [NB] int64: the block's expert, E for an unused block
    block_start: torch.Tensor  # [NB] int64: index into sorted_slots of the block's first slot
    block_end: torch.Tensor  # [NB] int64: end (exclusive) of the block's slots in sorted_slots

    @classmethod
    def make(cls, ids: torch.Tensor, num_experts: int, block_m: int) -> "ExpertBlocks":
        """ids [T, k] -> the blocks of at most block_m slots per expert."""
        flat = ids.reshape(-1)  # [S]
        sorted_slots = flat.argsort(stable=True)  # [S]
        counts = torch.bincount(flat, minlength=num_experts)  # [E]
        segment_end = counts.cumsum(0)  # [E]
        blocks = (counts + block_m - 1) // block_m  # [E] blocks per expert
        blocks_end = blocks.cumsum(0)  # [E]
        n_blocks = triton.cdiv(flat.numel(), block_m) + num_experts  # upper bound of sum(blocks), known on the host
        block = torch.arange(n_blocks, device=ids.device)  # [NB]
        expert = torch.searchsorted(blocks_end, block, right=True)  # [NB] in [0, E]
        e = expert.clamp(max=num_experts - 1)
        start = segment_end[e] - counts[e] + (block - (blocks_end[e] - blocks[e])) * block_m
        return cls(sorted_slots, expert, start, torch.minimum(start + block_m, segment_end[e]))
