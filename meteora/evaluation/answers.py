"""Evaluating models on task samples: batched greedy answers, per-task accuracy, composite-n problems.

Works for any causal LM with generate(): the base model, a peft.PeftModel (one adapter, LoRA-B, merged), or
a MeteoraModel (routed, or with forced experts).
"""
from __future__ import annotations

import random

import torch

from ..prompts import composite, prompt_batch, to_device
from .metrics import METRICS


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 100) -> list[str]:
    """Greedy answers, cut at the end token (batched, left-padded)."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = to_device(prompt_batch(tokenizer, prompts[start:start + batch_size]), model.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def task_accuracy(model, tokenizer, samples: list[dict], metric: str = "exact_match") -> float:
    answers = generate_answers(model, tokenizer, [s["prompt"] for s in samples])
    return sum(METRICS[metric](a, s["response"]) for a, s in zip(answers, samples)) / len(samples)


def accuracy_per_task(model, tokenizer, eval_sets: dict[str, list[dict]], metrics: dict[str, str] | None = None) -> dict[str, float]:
    """{task: accuracy} over each task's samples, with its metric (exact match by default)."""
    return {task: task_accuracy(model, tokenizer, samples, (metrics or {}).get(task, "exact_match"))
            for task, samples in eval_sets.items()}


def composite_problems(eval_sets: dict[str, list[dict]], n: int, count: int, seed: int = 0) -> list[tuple[list[str], dict]]:
    """`count` composites of n problems from n different tasks: (task names in order, composite sample)."""
    rng = random.Random(f"composite:{n}:{seed}")
    problems = []
    for _ in range(count):
        tasks = rng.sample(sorted(eval_sets), n)
        problems.append((tasks, composite([rng.choice(eval_sets[t]) for t in tasks])))
    return problems


def composite_scores(model, tokenizer, problems, metrics: dict[str, str], max_new_tokens: int = 96) -> dict:
    """Each sub-answer (one per line, in order) scored with its task's metric.

    Returns {"per_position": [mean score of sub-problem i], "summed": mean over composites of the summed
    sub-scores (the paper's composite number, at most n)}.
    """
    answers = generate_answers(model, tokenizer, [sample["prompt"] for _, sample in problems], max_new_tokens)
    return _composite_summary(problems, [answer.split("\n") for answer in answers], metrics)


def composite_oracle_scores(model, tokenizer, problems, metrics: dict[str, str]) -> dict:
    """The composite oracle, scored like composite_scores: every sub-problem asked alone (its line of the
    composite prompt) with its own task's expert forced. model: a MeteoraModel whose experts are named by task."""
    asked: dict[str, list[tuple[int, int, str]]] = {}  # task -> (composite, position, prompt line)
    for c, (tasks, sample) in enumerate(problems):
        for i, (task, line) in enumerate(zip(tasks, sample["prompt"].splitlines(keepends=True))):
            asked.setdefault(task, []).append((c, i, line))
    lines = [[""] * len(tasks) for tasks, _ in problems]
    for task, questions in asked.items():
        with model.force_experts([task]):
            answers = generate_answers(model, tokenizer, [line for _, _, line in questions])
        for (c, i, _), answer in zip(questions, answers):
            lines[c][i] = answer
    return _composite_summary(problems, lines, metrics)


def _composite_summary(problems, lines: list[list[str]], metrics: dict[str, str]) -> dict:
    """Scores of the sub-answers lines[c][i] of composite c (see composite_scores)."""
    n = len(problems[0][0])
    totals, per_position = [], [0.0] * n
    for (tasks, sample), answer in zip(problems, lines):
        references = sample["response"].split("\n")
        scores = [METRICS[metrics[t]](answer[i] if i < len(answer) else "", references[i]) for i, t in enumerate(tasks)]
        totals.append(sum(scores))
        per_position = [p + s for p, s in zip(per_position, scores)]
    return {"per_position": [p / len(problems) for p in per_position], "summed": sum(totals) / len(problems)}
