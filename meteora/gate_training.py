"""Training the gates on task-labelled samples: data from a registry, one step, and a single-process loop.

Every expert's samples are labelled with that expert's index; a batch carries, besides the LM inputs, the
task label of every token (-100 at padding) for CE_gate. The step is what a distributed worker runs too.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

import torch

from .model import MeteoraModel
from .registry import Registry
from .text_data import to_device, training_batch
from .training import lm_labels, meteora_loss, routing_accuracy, task_labels


@dataclass
class GateTrainingConfig:
    steps: int = 300  # optimizer steps
    batch: int = 32  # samples per step
    lr: float = 5e-3  # Adam on the gates only
    gate_weight: float = 50.0  # lambda in CE_LM + lambda * CE_gate (the paper's value)
    exclude_prompt: bool = True  # CE_LM on response tokens only
    seed: int = 0


def registry_samples(registry: Registry, expert_names: list[str], split: str) -> list[tuple[dict, int]]:
    """(sample, expert index) for every sample of every expert's `split` data in the registry."""
    samples = []
    for index, name in enumerate(expert_names):
        lines = registry.data_file(name, split).read_text().splitlines()
        samples += [(json.loads(line), index) for line in lines if line.strip()]
    return samples


def gate_batch(tokenizer, samples: list[tuple[dict, int]]) -> dict[str, torch.Tensor]:
    """training_batch(...) plus token_tasks [B, S]: each token's expert index, -100 at padding."""
    batch = training_batch(tokenizer, [sample for sample, _ in samples])
    batch["token_tasks"] = task_labels(torch.tensor([task for _, task in samples]), batch["attention_mask"])
    return batch


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


def train_gates(model: MeteoraModel, tokenizer, samples: list[tuple[dict, int]], config: GateTrainingConfig,
                on_step=None) -> list[dict[str, float]]:
    """Train the gates in this process; `on_step(step, metrics)` after every step. Returns every step's metrics."""
    optimizer = torch.optim.Adam(model.gate_parameters(), lr=config.lr)
    rng = random.Random(config.seed)
    model.train()
    history = []
    for step in range(config.steps):
        optimizer.zero_grad()
        metrics = gate_step(model, gate_batch(tokenizer, rng.sample(samples, config.batch)), config)
        optimizer.step()
        history.append(metrics)
        if on_step is not None:
            on_step(step, metrics)
    model.eval()
    return history


@torch.no_grad()
def response_routing_accuracy(model: MeteoraModel, tokenizer, samples: list[tuple[dict, int]]) -> float:
    """Routing accuracy on response tokens only (every gate's top-1 against the sample's task)."""
    batch = to_device(gate_batch(tokenizer, samples), model.device)
    position = torch.arange(batch["input_ids"].shape[1], device=model.device)
    tasks = batch["token_tasks"].masked_fill(position < batch["prompt_lengths"].unsqueeze(1), -100)
    with model.capture_gate_logits() as gate_logits:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return routing_accuracy(gate_logits, tasks)
