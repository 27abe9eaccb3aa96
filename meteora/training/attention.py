"""Which attention a training step runs. On CPU, PyTorch's SDPA kernel is slow in the backward for short rows: on
SmolLM2-135M with batches of 16 rows of ~100 tokens, eager attention trains a LoRA 1.3x and the gates 1.14x
faster per step, with the same losses to bf16's rounding (benchmarks/NOTES.md). Eager keeps its attention weights
[B, heads, S, S] in every layer for the backward, so a batch whose weights would pass EAGER_BYTES a layer keeps
SDPA; so does any other device, and any model that does not run SDPA to begin with.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

EAGER_BYTES = 64 * 2**20  # fp32 attention weights per layer up to which a CPU training step runs eager attention


@contextmanager
def training_attention(model, shape: torch.Size) -> Iterator[str]:
    """Runs the block with the attention that trains a batch of `shape` [B, S] fastest (above) and yields its name;
    the model's own attention again after it. model: a transformers model (or a PEFT model around one)."""
    own = model.config._attn_implementation
    rows, width = shape
    weights = rows * model.config.num_attention_heads * width * width * 4
    eager = own == "sdpa" and model.device.type == "cpu" and weights <= EAGER_BYTES
    model.set_attn_implementation("eager" if eager else own)
    try:
        yield "eager" if eager else own
    finally:
        model.set_attn_implementation(own)
