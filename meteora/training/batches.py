"""Task-labelled training data for the gates: samples from a registry, batches with per-token task labels, one step.

Every expert's samples are labelled with that expert's index; a batch carries, besides the LM inputs, the
task label of every token (-100 at padding) for CE_gate. The step is what a distributed worker runs too.

A training item is a labelled sample (sample, expert index) or a composite: a list of labelled samples asked in
one prompt and answered in order (the prompt format's composite). A composite's tokens are labelled per segment:
a prompt token with its own problem's task (scaffolding with the problem before it), a response token (and the
prompt's last token) with the task of the answer its next token belongs to, so CE_gate teaches the gates to
switch experts in the middle of a generation. A chat template's scaffolding before the first problem (system
prompt and role header, half the prompt of a short question) is not labelled: a token that has seen only it
carries no task, and CE_gate there would only pull the gates toward uniform. The plain format's one <bos> is
labelled with the first problem's task: leaving it out too cost the tinytasks demo MeteoRA top-1 0.86 -> 0.70
exact match (top-2 0.88 either way; benchmarks/NOTES.md). Samples are encoded in the experts' prompt format
(plain or chat).
"""
from __future__ import annotations

import torch

from ..batching import pad_right, to_device
from ..model import MeteoraModel
from ..prompts import PromptFormat, encode_with_owners, fill_owners
from ..registry import Registry, read_samples
from .config import GateTrainingConfig
from .loss import IGNORE, lm_labels, meteora_loss, routing_accuracy
from .sampling import Item, Sample


def registry_samples(registry: Registry, expert_names: list[str], split: str) -> list[Sample]:
    """(sample, expert index) for every sample of every expert's `split` data in the registry."""
    samples = []
    for index, name in enumerate(expert_names):
        path = registry.data_file(name, split)
        samples += [(sample, index) for sample in read_samples(path.read_bytes(), f"{name}'s {split} data {path}")]
    return samples


def gate_batch(tokenizer, items: list[Item], fmt: PromptFormat = PromptFormat("plain")) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask [B, S] (right-padded), prompt_lengths [B] and token_tasks [B, S]: each token's
    expert index (see the module docstring), -100 at padding."""
    rows, tasks, prompt_lengths = [], [], []
    for item in items:
        part = item if isinstance(item, list) else [item]
        joined = fmt.composite([sample for sample, _ in part])
        prompt, owners, response, answer_owners = encode_with_owners(
            tokenizer, fmt, joined.prompt, joined.prompt_spans, joined.response, joined.response_spans, fill=False)
        lead = next((i for i, owner in enumerate(owners) if owner >= 0), len(owners)) if fmt.name == "chat" else 0
        segment = [part[owner][1] for owner in fill_owners(owners) + fill_owners(answer_owners)]  # each token's segment's task
        rows.append(prompt + response)
        row = segment[:len(prompt) - 1] + segment[len(prompt):] + segment[-1:]  # from the prompt's last token: the next one's
        tasks.append([IGNORE] * lead + row[lead:])
        prompt_lengths.append(len(prompt))
    return {**pad_right(rows, tokenizer.pad_token_id), "prompt_lengths": torch.tensor(prompt_lengths),
            "token_tasks": pad_right(tasks, IGNORE)["input_ids"]}


def gate_step(model: MeteoraModel, batch: dict[str, torch.Tensor], config: GateTrainingConfig) -> dict[str, float]:
    """Forward and backward of one batch (the caller steps the optimizer). Returns the losses and routing accuracy."""
    batch = to_device(batch, model.device)
    prompts = batch["prompt_lengths"] if config.exclude_prompt else None
    labels = lm_labels(batch["input_ids"], batch["attention_mask"], prompts)
    # logits only from the first position that predicts a label on (the vocabulary projection dominates otherwise)
    start = int(batch["prompt_lengths"].min()) - 1 if config.exclude_prompt else 0
    with model.capture_gate_logits() as gate_logits:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    logits_to_keep=labels.shape[1] - start)
    loss = meteora_loss(out.logits, labels[:, start:], gate_logits, batch["token_tasks"], config.gate_weight)
    loss.total.backward()
    return {"loss": loss.total.item(), "lm_loss": loss.lm.item(), "gate_loss": loss.gate.item(),
            "routing_accuracy": routing_accuracy(gate_logits, batch["token_tasks"])}


@torch.no_grad()
def response_routing_accuracy(model: MeteoraModel, tokenizer, items: list[Item], fmt: PromptFormat = PromptFormat("plain"),
                              batch_size: int = 16) -> float:
    """Routing accuracy on response tokens only (every gate's top-1 against the token's task), over all items.
    batch_size 16: at 64, chattasks' eval rows on SmolLM2 raised a process's peak memory by 3.6 GB (16: 0.5 GB),
    which, at every checkpoint of the loop, ran 2 training workers out of this 24 GB machine's memory."""
    right = total = 0
    for start in range(0, len(items), batch_size):
        batch = to_device(gate_batch(tokenizer, items[start:start + batch_size], fmt), model.device)
        position = torch.arange(batch["input_ids"].shape[1], device=model.device)
        tasks = batch["token_tasks"].masked_fill(position < batch["prompt_lengths"].unsqueeze(1), IGNORE)
        with model.capture_gate_logits() as gate_logits:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
        count = int((tasks != IGNORE).sum()) * len(gate_logits)
        right += routing_accuracy(gate_logits, tasks) * count
        total += count
    return right / total if total else float("nan")
