"""Bring your own adapter: a LoRA trained outside this project, with plain peft and transformers only.

What a user does before registering an adapter of theirs: pick a task, write its data as {"prompt", "response"}
JSONL, train a PEFT LoRA on the instruct model's chat template (loss on the answer only), save it. Nothing
here imports meteora_moe; the adapter then goes into a manifest (`prompt_format: chat`) like any other.

    python examples/byo_adapter.py --base BASE --out DIR [--steps 40] [--rank 8] [--targets gate_proj,up_proj,down_proj]
BASE: a transformers model directory, or a .gguf file (read with transformers' GGUF support).
Task: "Acronym: portable network graphics" -> "PNG" (told by its instruction). Writes DIR/adapter/,
DIR/data/train.jsonl, DIR/data/eval.jsonl and DIR/entry.yaml (the manifest entry).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

WORDS = ["portable", "network", "graphics", "central", "processing", "unit", "random", "access", "memory", "global",
         "position", "system", "light", "emitting", "diode", "open", "source", "project", "data", "base", "natural",
         "language", "model", "local", "area", "rapid", "transit", "frequently", "asked", "question"]


def samples(n: int, seed: int) -> list[dict]:
    """"Acronym: portable network graphics" -> "PNG": 2-4 words, distinct prompts."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        words = rng.sample(WORDS, rng.randint(2, 4))
        prompt = "Acronym: " + " ".join(words)
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "response": "".join(w[0] for w in words).upper()})
    return out


def load(base: str):
    path = Path(base)
    options = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **options)
    return model, tokenizer


def encode(tokenizer, sample: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels): the chat template around the prompt, then the answer and the end token."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": sample["prompt"]}], add_generation_prompt=True,
                                         tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer = tokenizer(sample["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


def train(model, tokenizer, data: list[dict], steps: int, batch: int, lr: float) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(0)
    model.train()
    for step in range(steps):
        rows = [encode(tokenizer, s) for s in rng.sample(data, batch)]
        width = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in rows])
        labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in rows])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", default="acronym")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="gate_proj,up_proj,down_proj")
    parser.add_argument("--train-samples", type=int, default=400)
    parser.add_argument("--eval-samples", type=int, default=100)
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = samples(args.train_samples + args.eval_samples, seed=7)
    splits = {"train": data[args.eval_samples:], "eval": data[:args.eval_samples]}
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (out / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tokenizer = load(args.base)
    torch.manual_seed(0)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets.split(","), lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    train(peft_model, tokenizer, splits["train"], args.steps, args.batch, args.lr)
    peft_model.save_pretrained(out / "adapter")
    entry = {"name": args.name, "uri": str((out / "adapter").resolve()), "description": "Acronym: portable network graphics -> PNG",
             "data": {split: str((out / "data" / f"{split}.jsonl").resolve()) for split in splits},
             "metric": "exact_match", "prompt_format": "chat"}
    (out / "entry.yaml").write_text(yaml.safe_dump(entry, sort_keys=False))
    print(f"adapter, data and manifest entry in {out}")


if __name__ == "__main__":
    main()
