"""Turning {"prompt", "response"} samples into token batches: right-padded for training, left-padded to generate.

Training rows are <s> prompt response </s>, with labels -100 on <s>, the prompt and the padding, so the loss
is on the response (and its end) only. A composite puts several samples' prompts one after the other and
answers them in order, one answer per line.
"""
from __future__ import annotations

import torch

__all__ = ["chat_prompt_ids", "composite", "prompt_batch", "prompt_ids", "to_device", "training_batch"]


def training_batch(tokenizer, samples: list[dict]) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels [B, S] (right-padded) and prompt_lengths [B] (counting <s>)."""
    rows, labels, prompt_lengths = [], [], []
    for sample in samples:
        prompt = [tokenizer.bos_token_id] + tokenizer(sample["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(sample["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + response)
        labels.append([-100] * len(prompt) + response)
        prompt_lengths.append(len(prompt))
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])  # [B, S]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
        "labels": torch.tensor([label + [-100] * (width - len(label)) for label in labels]),
        "prompt_lengths": torch.tensor(prompt_lengths),
    }


def composite(samples: list[dict]) -> dict:
    """n problems in one prompt, answered in order in one response, one answer per line."""
    return {"prompt": "".join(s["prompt"] for s in samples), "response": "\n".join(s["response"] for s in samples)}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """<s> prompt as token ids, the way training rows begin (no <s> for a tokenizer that has none)."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Chat messages [{role, content}] as the prompt for the assistant's reply: the tokenizer's chat template,
    or, when it has none, the contents one per line (the plain prompt format the tiny models know)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return prompt_ids(tokenizer, "".join(m["content"] + "\n" for m in messages))


def prompt_batch(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """<s> prompt, left-padded for batched generation: input_ids / attention_mask [B, S]."""
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    width = max(map(len, rows))
    return {
        "input_ids": torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
    }
