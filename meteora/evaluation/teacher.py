"""Perfect routing: generation with every problem's tokens sent to its own task's expert (teacher routing).

    prompt    a token inside problem i's text -> expert of task i; scaffolding (template, numbering between
              problems, few-shot turns) -> the gates; the last prompt token, which predicts the first answer's
              first token -> the first problem's expert (as gate training labels it)
    answer    every generated token -> the expert of the answer its next token belongs to (PromptFormat.next_answer:
              the line being written, the next one once a line ends), as gate training labels it
What MeteoRA would score with gates that never err: the gap between it and the gated rows is routing, the gap
between it and the oracle (each problem asked alone) is the adapters. Greedy, batched, left-padded, KV-cached.
"""
from __future__ import annotations

import torch

from ..batching import pad_left, position_ids
from ..model import MeteoraModel
from ..prompts import PromptFormat, encode_with_owners
from .answers import CompositeProblem, Shots, composite_summary


@torch.no_grad()
def teacher_routed_tokens(model: MeteoraModel, tokenizer, problems: list[CompositeProblem], fmt: PromptFormat,
                          shots: Shots = (), max_new_tokens: int = 32, batch_size: int = 16) -> list[list[int]]:
    """The tokens generated for every composite under perfect routing (up to and with the end token)."""
    tokens = []
    for start in range(0, len(problems), batch_size):
        tokens += _generate(model, tokenizer, problems[start:start + batch_size], fmt, shots, max_new_tokens)
    return tokens


def teacher_routed_answers(model: MeteoraModel, tokenizer, problems: list[CompositeProblem], fmt: PromptFormat,
                           shots: Shots = (), max_new_tokens: int = 32) -> list[list[str]]:
    """The n answers of every composite, generated under perfect routing."""
    tokens = teacher_routed_tokens(model, tokenizer, problems, fmt, shots, max_new_tokens)
    return [fmt.answers(tokenizer.decode(t, skip_special_tokens=True), len(p.tasks)) for t, p in zip(tokens, problems)]


def teacher_routed_scores(model: MeteoraModel, tokenizer, problems: list[CompositeProblem], metrics: dict[str, str],
                          fmt: PromptFormat, shots: Shots = (), tokens_per_answer: int = 16) -> dict:
    n = len(problems[0].tasks)
    answers = teacher_routed_answers(model, tokenizer, problems, fmt, shots, tokens_per_answer * n)
    return composite_summary(problems, answers, metrics)


def _generate(model, tokenizer, problems, fmt, shots, max_new_tokens) -> list[list[int]]:
    experts = [[model.expert_names.index(t) for t in p.tasks] for p in problems]  # [B, n] expert of each sub-problem
    rows, routes = [], []
    for problem, ids in zip(problems, experts):
        prompt, owners, _, _ = encode_with_owners(tokenizer, fmt, problem.joined.prompt, problem.joined.prompt_spans,
                                                  "", (), shots, fill=False)
        rows.append(prompt)
        routes.append([ids[o] if o >= 0 else -1 for o in owners[:-1]] + [ids[0]])
    batch = pad_left(rows, tokenizer.pad_token_id)
    device, mask = model.device, batch["attention_mask"]
    routing = pad_left(routes, -1)["input_ids"]  # [B, P]; padding: the gates (masked out anyway)
    positions = position_ids(mask)
    with model.route_tokens(routing):
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device),
                    position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
    generated = [[] for _ in problems]
    done = torch.zeros(len(problems), dtype=torch.bool)
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].float().argmax(-1).cpu()  # [B]
        for b in range(len(problems)):
            if not done[b]:
                generated[b].append(int(token[b]))
        done |= token == tokenizer.eos_token_id
        if done.all():
            break
        current = [ids[fmt.next_answer(tokenizer.decode(g, skip_special_tokens=True), len(ids))]
                   for ids, g in zip(experts, generated)]
        mask = torch.cat([mask, torch.ones(len(problems), 1, dtype=mask.dtype)], dim=1)
        positions = positions[:, -1:] + 1
        with model.route_tokens(torch.tensor(current).view(-1, 1)):
            out = model(input_ids=token.view(-1, 1).to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), cache=out.cache, use_cache=True)
    return generated

