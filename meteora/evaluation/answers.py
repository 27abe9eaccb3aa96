"""Evaluating models on task samples: batched greedy answers, per-task accuracy, composite-n problems.

Works for any causal LM with generate(): the base model, a peft.PeftModel (one adapter, LoRA-B, merged), or a
MeteoraModel (routed, forced, or teacher-routed: evaluation/teacher.py). Prompts are written in the benchmark's
prompt format (meteora_moe.prompts); a composite is scored per sub-answer with its task's metric, and the paper's
composite number is the sum over its n sub-problems.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..batching import pad_left, to_device
from ..prompts import Composite, PromptFormat
from .metrics import METRICS

Shots = tuple[tuple[str, str], ...]  # few-shot examples: (prompt, response) turns before the question
ANSWER_TOKENS = 24  # new tokens generated for one answer unless said otherwise


@dataclass(frozen=True)
class CompositeProblem:
    tasks: list[str]  # the task of each sub-problem, in order
    samples: list[dict]  # each sub-problem as its own sample
    joined: Composite  # the n of them as one prompt, in the benchmark's format


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], fmt: PromptFormat, shots: Shots = (),
                     max_new_tokens: int = ANSWER_TOKENS, batch_size: int = 32) -> list[str]:
    """Greedy answers, cut at the end token (batched, left-padded)."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        rows = [fmt.prompt_ids(tokenizer, p, shots) for p in prompts[start:start + batch_size]]
        batch = to_device(pad_left(rows, tokenizer.pad_token_id), model.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def task_accuracy(model, tokenizer, samples: list[dict], fmt: PromptFormat, metric: str = "exact_match") -> float:
    budget = answer_budget(tokenizer, samples, metric)
    answers = generate_answers(model, tokenizer, [s["prompt"] for s in samples], fmt, max_new_tokens=budget)
    return score(answers, samples, metric)


def answer_budget(tokenizer, samples: list[dict], metric: str, most: int = ANSWER_TOKENS, margin: int = 4) -> int:
    """New tokens worth generating for samples: under exact match an answer longer than the longest reference (by
    a margin, for another tokenization or leading spaces) cannot score, so generating stops there; `most` else."""
    if metric != "exact_match":
        return most
    longest = max(len(tokenizer(s["response"], add_special_tokens=False)["input_ids"]) for s in samples)
    return min(most, longest + margin)


def score(answers: list[str], samples: list[dict], metric: str) -> float:
    return sum(METRICS[metric](a, s["response"]) for a, s in zip(answers, samples)) / len(samples)


def accuracy_per_task(model, tokenizer, eval_sets: dict[str, list[dict]], fmt: PromptFormat,
                      metrics: dict[str, str] | None = None) -> dict[str, float]:
    """{task: accuracy} over each task's samples, with its metric (exact match by default)."""
    return {task: task_accuracy(model, tokenizer, samples, fmt, (metrics or {}).get(task, "exact_match"))
            for task, samples in eval_sets.items()}


def composite_problems(eval_sets: dict[str, list[dict]], n: int, count: int, fmt: PromptFormat,
                       seed: int = 0) -> list[CompositeProblem]:
    """`count` composites of n problems from n different tasks (the same for every variant evaluated)."""
    rng = random.Random(f"composite:{n}:{seed}")
    problems = []
    for _ in range(count):
        tasks = rng.sample(sorted(eval_sets), n)
        samples = [rng.choice(eval_sets[t]) for t in tasks]
        problems.append(CompositeProblem(tasks, samples, fmt.composite(samples)))
    return problems


def composite_shots(eval_sets: dict[str, list[dict]], n: int, shots: int, fmt: PromptFormat,
                    questions: list[CompositeProblem] | None = None) -> Shots:
    """`shots` worked composites of n problems, as (prompt, response) turns, drawn from the samples that none of
    the `questions` asks (a worked example would hand over a question's answer); a task whose samples the
    questions ask every one of lends any of them."""
    asked = {(s["prompt"], s["response"]) for question in questions or [] for s in question.samples}
    pools = {task: [s for s in samples if (s["prompt"], s["response"]) not in asked] or samples
             for task, samples in eval_sets.items()}
    return tuple((p.joined.prompt, p.joined.response) for p in composite_problems(pools, n, shots, fmt, seed=-1))


def composite_scores(model, tokenizer, problems: list[CompositeProblem], metrics: dict[str, str], fmt: PromptFormat,
                     shots: Shots = (), tokens_per_answer: int = 16) -> dict:
    """Each sub-answer scored with its task's metric: {"per_position": [mean score of sub-problem i], "summed": mean
    over composites of the summed sub-scores (the paper's composite number, at most n)}."""
    n = len(problems[0].tasks)
    responses = generate_answers(model, tokenizer, [p.joined.prompt for p in problems], fmt, shots, tokens_per_answer * n)
    return composite_summary(problems, [fmt.answers(r, n) for r in responses], metrics)


def composite_oracle_scores(model, tokenizer, problems: list[CompositeProblem], metrics: dict[str, str],
                            fmt: PromptFormat) -> dict:
    """The oracle, scored like composite_scores: every sub-problem asked alone with its own task's expert forced.
    model: a MeteoraModel whose experts are named by task."""
    asked: dict[str, list[tuple[int, int]]] = {}  # task -> (composite, position)
    for c, problem in enumerate(problems):
        for i, task in enumerate(problem.tasks):
            asked.setdefault(task, []).append((c, i))
    answers = [[""] * len(p.tasks) for p in problems]
    for task, where in asked.items():
        with model.force_experts([task]):
            replies = generate_answers(model, tokenizer, [problems[c].samples[i]["prompt"] for c, i in where], fmt)
        for (c, i), reply in zip(where, replies):
            answers[c][i] = reply
    return composite_summary(problems, answers, metrics)


def composite_summary(problems: list[CompositeProblem], answers: list[list[str]], metrics: dict[str, str]) -> dict:
    """Scores of the sub-answers answers[c][i] of composite c (see composite_scores)."""
    n = len(problems[0].tasks)
    totals, per_position = [], [0.0] * n
    for problem, answer in zip(problems, answers):
        scores = [METRICS[metrics[t]](answer[i], s["response"]) for i, (t, s) in enumerate(zip(problem.tasks, problem.samples))]
        totals.append(sum(scores))
        per_position = [p + s for p, s in zip(per_position, scores)]
    return {"per_position": [p / len(problems) for p in per_position], "summed": sum(totals) / len(problems)}
