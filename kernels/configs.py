"""Launch configurations of the mixture-of-LoRA kernels: a small documented table, not autotuning.

Why a table: the right blocks depend mostly on the regime, and autotuning every (layer shape, rank, token
count) at serve time costs seconds per new shape. Values follow vLLM's LoRA shrink/expand defaults and the
shapes of a 7-8B model (d = 4096, 11008/14336); they were not yet tuned on a GPU (none was available when
they were written): `benchmarks/bench_kernels.py` records the table it ran with, so a tuning run can
compare against it.
  decode (gathered kernels): mat-vecs streaming the picked experts' rows; wide K / N tiles for coalescing.
  prefill (grouped kernels): tl.dot tiles over blocks of slots that share an expert; BLOCK_M = 64 so an
    expert's A/B tile is reused by 64 tokens per load.
  BLOCK_R covers the largest rank in one tile up to 64; higher ranks take several rank tiles (shrink) or
    several loop steps (expand), so any rank works.
"""
from __future__ import annotations

import triton

DECODE_MAX_TOKENS = 64  # up to this many tokens the per-token (gathered) kernels run; above, the grouped ones

DECODE = {"BLOCK_K": 128, "BLOCK_N": 128, "num_warps": 4}
PREFILL = {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def block_r(r_max: int) -> int:
    """Rank tile: the next power of two of the largest rank, between 16 (tl.dot's minimum) and 64."""
    return min(64, max(16, triton.next_power_of_2(r_max)))
