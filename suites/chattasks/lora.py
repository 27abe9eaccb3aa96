"""Training one PEFT LoRA on chat-format items, as an adapter author would (plain peft and transformers).

An item is one sample asked alone, or several asked as one composite in which only sample `own` is this adapter's
task: the other problems and their answers are context, the loss is on the own answer's tokens only (its "k. "
number, its text and the line end). So an adapter answers its problem wherever it stands among others, and knows
nothing of their tasks. An item may also carry worked examples (shots: earlier user / assistant turns, context
only), as the paper's few-shot composite prompts have.

Savings, none of which changes a step: logits only where there are labels (the 49k-token output layer is most of
a small model's cost); each batch run in passes of rows of about one length, cut where they cost least
(passes), their gradients accumulated (step_gradients: little padding computed); the prefix every row of a pass
shares (the template's system prompt) computed once and its keys and values repeated for the rows; eager
attention for short rows (meteora_moe.training.training_attention); bf16 autocast when asked (fp32 master weights;
twice as fast as fp32 on a CPU with AMX, 0.68x without: meteora_moe.model.bf16_is_fast), the frozen weights cast to
bf16 once (frozen_weights_in_bf16).
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import warnings
from dataclasses import dataclass

import torch

from meteora_moe.batching import pad_right
from meteora_moe.prompts import PromptFormat, encode_with_owners
from meteora_moe.training import training_attention

# target module sets (SmolLM2's names, as in LLaMA)
QV, QKVO, QVO = ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PASS_COST = 40  # a training pass's fixed cost on SmolLM2-135M, in tokens of a row (experiments/FINDINGS.md, passes.py)


@dataclass(frozen=True)
class Item:
    samples: list[dict]  # asked in one prompt (one: asked alone)
    own: int = 0  # the index of the one this adapter answers
    shots: tuple[tuple[str, str], ...] = ()  # worked (prompt, response) turns before it


def lora_model(base, rank: int, targets: tuple[str, ...], rslora: bool, seed: int):
    """A fresh PEFT LoRA on a copy of `base` (alpha = 2r, no dropout)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), use_rslora=rslora,
                            lora_dropout=0.0, task_type="CAUSAL_LM")
        return get_peft_model(copy.deepcopy(base), config)


def train(model, tokenizer, fmt: PromptFormat, items: list[Item], steps: int, lr: float, batch: int, seed: int,
          bf16: bool = False, pass_cost: int = PASS_COST):
    """AdamW with a short warm-up and linear decay; each step a random batch of `items` (step_gradients)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1,
                                                   anneal_strategy="linear")
    encoded = [encode_item(tokenizer, fmt, item) for item in items]  # tokenized once
    rng = random.Random(seed)
    model.train()
    with frozen_weights_in_bf16(model) if bf16 else contextlib.nullcontext():
        for _ in range(steps):
            optimizer.zero_grad()
            step_gradients(model, rng.sample(encoded, min(batch, len(encoded))), tokenizer.pad_token_id, pass_cost,
                           bf16)
            optimizer.step()
            schedule.step()
    return model.eval()


@contextlib.contextmanager
def frozen_weights_in_bf16(model):
    """The frozen linear layers' weights in bf16 for a training under bf16 autocast, cast once, where autocast
    would cast them again in every pass (the same values; 1.2x on SmolLM2-135M: experiments/FINDINGS.md,
    cast_once.py); their fp32 weights back after. Weights tied to the input embeddings stay (the embeddings would
    be bf16 too)."""
    tied = model.get_input_embeddings().weight
    kept = [(m.weight, m.weight.data) for m in model.modules()
            if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad and m.weight is not tied]
    for weight, data in kept:
        weight.data = data.to(torch.bfloat16)
    try:
        yield
    finally:
        for weight, data in kept:
            weight.data = data


def step_gradients(model, rows: list[tuple[list[int], list[int]]], pad: int, pass_cost: int = PASS_COST,
                   bf16: bool = False) -> float:
    """Accumulates the gradient of the batch's loss (the mean over all its labelled tokens) in passes of rows of
    about one length (passes): one pass's gradient over the whole padded batch, without computing most of its
    padding (about half of a batch of singles and composites). Returns the loss."""
    rows = sorted(rows, key=lambda row: len(row[0]))
    labelled = sum(label != -100 for _, labels in rows for label in labels)
    total = 0.0
    for rows_of_pass in passes([len(ids) for ids, _ in rows], pass_cost):
        part = padded_batch(rows[rows_of_pass], pad)
        with training_attention(model, part["input_ids"].shape), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = lm_loss(model, part, reduction="sum") / labelled
        loss.backward()
        total += loss.item()
    return total


def passes(lengths: list[int], pass_cost: int) -> list[slice]:
    """Rows of these lengths, sorted, cut into the passes that cost least: a pass computes each of its rows at its
    longest row's length, plus pass_cost tokens' worth of fixed cost (every weight read, each layer's overheads).
    The cheapest cuts by dynamic programming: best[end], the least cost of the first `end` rows."""
    best, cut = [0] + [math.inf] * len(lengths), [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        for start in range(end):
            cost = best[start] + (end - start) * lengths[end - 1] + pass_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    slices, end = [], len(lengths)
    while end:
        slices.append(slice(cut[end], end))
        end = cut[end]
    return slices[::-1]


def lm_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy on the labelled tokens of a right-padded batch (see the module docstring)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]  # [B, S]
    start = int(batch["first_label"].min()) - 1  # the first position that predicts a label
    shared = min(_common_prefix(ids, mask), start)  # no position that predicts a label is in the shared prefix
    shared, cache = (shared if shared > 1 else 0), None  # a prefix of one token is not worth a pass of its own
    if shared:
        cache = model(input_ids=ids[:1, :shared], use_cache=True).cache  # the prefix once: [1, heads, shared, dim]
        cache.batch_repeat_interleave(ids.shape[0])  # [B, heads, shared, dim]; the gradient sums over the rows
    positions = torch.arange(shared, ids.shape[1]).expand(ids.shape[0], -1)  # [B, S - shared]
    out = model(input_ids=ids[:, shared:], attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=cache is not None, logits_to_keep=ids.shape[1] - start)
    labels = batch["labels"][:, start + 1:]  # position p predicts token p + 1
    return torch.nn.functional.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                             reduction=reduction)


def _common_prefix(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading tokens every row has, and has alike."""
    same = (ids == ids[:1]) & (mask == 1)  # [B, S]
    return int(same.all(0).long().cumprod(0).sum())


def encode_item(tokenizer, fmt: PromptFormat, item: Item) -> tuple[list[int], list[int]]:
    """(token ids, labels): the labels -100 but on the own answer's tokens."""
    joined = fmt.composite(item.samples)
    prompt, _, response, owners = encode_with_owners(tokenizer, fmt, joined.prompt, joined.prompt_spans,
                                                     joined.response, joined.response_spans, item.shots)
    return prompt + response, [-100] * len(prompt) + [t if o == item.own else -100 for t, o in zip(response, owners)]


def padded_batch(encoded: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Rows of encode_item as input_ids / attention_mask / labels [B, S], right-padded; first_label [B]: the first
    labelled position."""
    batch = pad_right([ids for ids, _ in encoded], pad)
    batch["labels"] = pad_right([labels for _, labels in encoded], -100)["input_ids"]
    batch["first_label"] = (batch["labels"] != -100).int().argmax(1)
    return batch
