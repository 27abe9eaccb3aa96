"""Training one PEFT LoRA on chat-format items, as an adapter author would (plain peft and transformers).

An item is (samples, own): one sample asked alone (own = 0), or several asked as one composite in which only
sample `own` is this adapter's task: the other problems and their answers are context, the loss is on the own
answer's tokens only (its "k. " number, its text and the line end). So an adapter answers its problem wherever it
stands among others, and knows nothing of their tasks. Logits are computed only where there are labels (the
49k-token output layer is most of a small model's cost), and the forward and backward run under bf16 autocast
when asked (fp32 master weights; twice as fast as fp32 on a CPU with AMX, such as this project's).
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
        start = int(encoded["first_label"].min()) - 1  # the first position that predicts a label
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                        logits_to_keep=encoded["input_ids"].shape[1] - start)
        labels = encoded["labels"][:, start + 1:]  # position p predicts token p + 1
        logits = out.logits[:, :-1].float().flatten(0, 1)
        loss = torch.nn.functional.cross_entropy(logits, labels.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


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
