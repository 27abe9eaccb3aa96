"""Token rows into model inputs: padded tensors (left for generation, right for training), the position ids of
left-padded rows, and a labelled batch for language-model training."""
from __future__ import annotations

import torch

from .prompts import PromptFormat

__all__ = ["pad_left", "pad_right", "position_ids", "to_device", "training_batch"]


def training_batch(tokenizer, samples: list[dict], fmt: PromptFormat = PromptFormat("plain")) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels [B, S] (right-padded; labels -100 but on the response and <eos>) and
    prompt_lengths [B]."""
    rows, labels, prompt_lengths = [], [], []
    for sample in samples:
        prompt = fmt.prompt_ids(tokenizer, sample["prompt"])
        response = tokenizer(sample["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + response)
        labels.append([-100] * len(prompt) + response)
        prompt_lengths.append(len(prompt))
    return {**pad_right(rows, tokenizer.pad_token_id), "labels": pad_right(labels, -100)["input_ids"],
            "prompt_lengths": torch.tensor(prompt_lengths)}


def pad_right(rows: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    return {"input_ids": torch.tensor([row + [pad] * (width - len(row)) for row in rows]),  # [B, S]
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])}


def pad_left(rows: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    return {"input_ids": torch.tensor([[pad] * (width - len(row)) + row for row in rows]),  # [B, S]
            "attention_mask": torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, S] of left-padded rows: 0 at each row's first real token (and on its padding)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}
