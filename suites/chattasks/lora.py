"""Training one PEFT LoRA on chat-format items, as an adapter author would (plain peft and transformers).

An item is (samples, own): one sample asked alone (own = 0), or several asked as one composite in which only
sample `own` is this adapter's task: the other problems and their answers are context, the loss is on the own
answer's tokens only (its "k. " number, its text and the line end). So an adapter answers its problem wherever it
stands among others, and knows nothing of their tasks. Three savings, none of which changes the loss: logits
only where there are labels (the 49k-token output layer is most of a small model's cost); the prefix every row
of a batch shares (the template's system prompt) computed once and its keys and values repeated for the rows;
bf16 autocast when asked (fp32 master weights; twice as fast as fp32 on a CPU with AMX, such as this project's).
"""
from __future__ import annotations

import copy
import random
import warnings

import torch

from meteora.prompts import PromptFormat, encode_with_owners, pad_right

Item = tuple[list[dict], int]  # (samples asked in one prompt, the index of the one this adapter answers)


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
          bf16: bool = False):
    """AdamW with a short warm-up and linear decay; each step a random batch of `items`."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1,
                                                   anneal_strategy="linear")
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        encoded = lm_batch(tokenizer, fmt, rng.sample(items, min(batch, len(items))))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = lm_loss(model, encoded)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy on the labelled tokens of a right-padded batch (see the module docstring)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]  # [B, S]
    start = int(batch["first_label"].min()) - 1  # the first position that predicts a label
    shared = min(_common_prefix(ids, mask), start)  # no position that predicts a label is in the shared prefix
    cache = None
    if shared > 1:
        cache = model(input_ids=ids[:1, :shared], use_cache=True).cache  # the prefix once: [1, heads, shared, dim]
        cache.batch_repeat_interleave(ids.shape[0])  # [B, heads, shared, dim]; the gradient sums over the rows
    positions = torch.arange(shared, ids.shape[1]).expand(ids.shape[0], -1)  # [B, S - shared]
    out = model(input_ids=ids[:, shared:], attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=cache is not None, logits_to_keep=ids.shape[1] - start)
    labels = batch["labels"][:, start + 1:]  # position p predicts token p + 1
    return torch.nn.functional.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def _common_prefix(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading tokens every row has, and has alike."""
    same = (ids == ids[:1]) & (mask == 1)  # [B, S]
    return int(same.all(0).long().cumprod(0).sum())


def lm_batch(tokenizer, fmt: PromptFormat, items: list[Item]) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels [B, S], right-padded; first_label [B]: the first labelled position."""
    rows, labels = [], []
    for samples, own in items:
        joined = fmt.composite(samples)
        prompt, _, response, owners = encode_with_owners(tokenizer, fmt, joined.prompt, joined.prompt_spans,
                                                         joined.response, joined.response_spans)
        rows.append(prompt + response)
        labels.append([-100] * len(prompt) + [t if o == own else -100 for t, o in zip(response, owners)])
    batch = pad_right(rows, tokenizer.pad_token_id)
    batch["labels"] = pad_right(labels, -100)["input_ids"]
    batch["first_label"] = (batch["labels"] != -100).int().argmax(1)
    return batch
