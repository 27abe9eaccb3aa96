"""Task-labelled training data for the gates: samples from a registry, batches with per-token task labels, one step.

Every expert's samples are labelled with that expert's index; a batch carries, besides the LM inputs, the
task label of every token (-100 at padding) for CE_gate. The step is what a distributed worker runs too.

A training item is a labelled sample (sample, expert index) or a composite: a list of labelled samples asked in
one prompt and answered in order (tasks.composite). A composite's tokens are labelled per segment: a prompt
token with its own problem's task, a response token (and the prompt's last token) with the task of the answer
its next token belongs to, so CE_gate teaches the gates to switch experts in the middle of a generation.
"""
from __future__ import annotations

import json

import torch

from ..model import MeteoraModel
from ..prompts import composite, to_device, training_batch
from ..registry import Registry
from .config import GateTrainingConfig
from .loss import IGNORE, lm_labels, meteora_loss, routing_accuracy
from .sampling import Item, Sample


def registry_samples(registry: Registry, expert_names: list[str], split: str) -> list[Sample]:
    """(sample, expert index) for every sample of every expert's `split` data in the registry."""
    samples = []
    for index, name in enumerate(expert_names):
        lines = registry.data_file(name, split).read_text().splitlines()
        samples += [(json.loads(line), index) for line in lines if line.strip()]
    return samples


def gate_batch(tokenizer, items: list[Item]) -> dict[str, torch.Tensor]:
    """training_batch(...) plus token_tasks [B, S]: each token's expert index, -100 at padding."""
    parts = [item if isinstance(item, list) else [item] for item in items]
    batch = training_batch(tokenizer, [composite([sample for sample, _ in part]) for part in parts])
    labels = [_token_tasks(tokenizer, part) for part in parts]
    if any(len(row) != n for row, n in zip(labels, batch["attention_mask"].sum(1).tolist())):
        raise ValueError("composite labels need a tokenizer that splits at the problems' boundaries")
    width = batch["input_ids"].shape[1]
    batch["token_tasks"] = torch.tensor([row + [IGNORE] * (width - len(row)) for row in labels])  # [B, S]
    return batch


def _token_tasks(tokenizer, part: list[Sample]) -> list[int]:
    """The task label of every token of <s> prompts answers </s> (see the module docstring)."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompts = [task for sample, task in part for _ in range(count(sample["prompt"]))]
    answers = [task for i, (sample, task) in enumerate(part)
               for _ in range(count(sample["response"] + ("\n" if i < len(part) - 1 else "")))]
    segment = [part[0][1]] + prompts + answers + [part[-1][1]]  # the segment each token is in, <s> and </s> included
    return segment[:len(prompts)] + segment[len(prompts) + 1:] + segment[-1:]  # from the prompt's last token on: the next one's


def gate_step(model: MeteoraModel, batch: dict[str, torch.Tensor], config: GateTrainingConfig) -> dict[str, float]:
    """Forward and backward of one batch (the caller steps the optimizer). Returns the losses and routing accuracy."""
    batch = to_device(batch, model.device)
    prompts = batch["prompt_lengths"] if config.exclude_prompt else None
    labels = lm_labels(batch["input_ids"], batch["attention_mask"], prompts)
    with model.capture_gate_logits() as gate_logits:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = meteora_loss(out.logits, labels, gate_logits, batch["token_tasks"], config.gate_weight)
    loss.total.backward()
    return {"loss": loss.total.item(), "lm_loss": loss.lm.item(), "gate_loss": loss.gate.item(),
            "routing_accuracy": routing_accuracy(gate_logits, batch["token_tasks"])}


@torch.no_grad()
def response_routing_accuracy(model: MeteoraModel, tokenizer, items: list[Item]) -> float:
    """Routing accuracy on response tokens only (every gate's top-1 against the token's task)."""
    batch = to_device(gate_batch(tokenizer, items), model.device)
    position = torch.arange(batch["input_ids"].shape[1], device=model.device)
    tasks = batch["token_tasks"].masked_fill(position < batch["prompt_lengths"].unsqueeze(1), IGNORE)
    with model.capture_gate_logits() as gate_logits:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return routing_accuracy(gate_logits, tasks)
