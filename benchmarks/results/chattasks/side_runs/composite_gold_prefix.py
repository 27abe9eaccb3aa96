"""Composites with every earlier answer given: how much of the gap between perfect routing and the oracle is the
adapters inside a long context, and how much their own earlier mistakes. On the 40 composites per n of
`composites_40.py` (0-shot, the same checkpoint and samples), each sub-problem i is answered after the prompt and
the gold answers "1. ..." to "i-1. ..." and "i.", and cut at its line; summed per composite as the benchmark sums.
Two ways: by its own expert alone (every token forced to it), and teacher-routed as perfect routing routes (each
problem's and each gold answer's tokens to their problem's expert, the generated ones to problem i's). Beside them
the oracle (each problem asked alone with its expert) on the same composites. The earlier side run
(`composite_adapters.py`) did the first 2-shot, with fewer lines."""
import copy
import json
import sys
from collections import defaultdict

import torch

from meteora import MeteoraModel
from meteora.evaluation import composite_oracle_scores, composite_problems, composite_summary, load_benchmark
from meteora.prompts import encode_with_owners, pad_left, position_ids, to_device
from meteora.registry import load_manifest


@torch.no_grad()
def gold_prefix_answers(model, bench, problems, batch_size: int = 16) -> list[list[str]]:
    n, tokenizer, fmt = len(problems[0].tasks), bench.tokenizer, bench.fmt
    asked = defaultdict(list)  # task -> [(composite, position)]
    for c, problem in enumerate(problems):
        for i, task in enumerate(problem.tasks):
            asked[task].append((c, i))
    answers = [[""] * n for _ in problems]
    for task, where in asked.items():
        with model.force_experts([task]):
            for start in range(0, len(where), batch_size):
                part = where[start:start + batch_size]
                prefixes = [_prefix(problems[c], i) for c, i in part]
                rows = [fmt.prompt_ids(tokenizer, problems[c].joined.prompt) + tokenizer(p, add_special_tokens=False)["input_ids"]
                        for (c, _), p in zip(part, prefixes)]
                batch = to_device(pad_left(rows, tokenizer.pad_token_id), model.device)
                out = model.generate(**batch, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
                texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
                for (c, i), prefix, text in zip(part, prefixes, texts):
                    answers[c][i] = fmt.answers(prefix + text, n)[i]
    return answers


def _prefix(problem, i: int) -> str:
    return "".join(f"{k + 1}. {s['response']}\n" for k, s in enumerate(problem.samples[:i])) + f"{i + 1}."


@torch.no_grad()
def teacher_gold_prefix_answers(model, bench, problems, batch_size: int = 16, max_new_tokens: int = 32) -> list[list[str]]:
    n, tokenizer, fmt = len(problems[0].tasks), bench.tokenizer, bench.fmt
    asked = [(c, i) for c in range(len(problems)) for i in range(n)]
    answers = [[""] * n for _ in problems]
    for start in range(0, len(asked), batch_size):
        part, rows, routes = asked[start:start + batch_size], [], []
        for c, i in part:
            problem, experts = problems[c], model.expert_ids(problems[c].tasks)
            ids, owners, _, _ = encode_with_owners(tokenizer, fmt, problem.joined.prompt, problem.joined.prompt_spans, "", (), fill=False)
            prefix = _prefix(problem, i)
            starts = [0] + [j + 1 for j, char in enumerate(prefix) if char == "\n"]  # line k: answer k; its "\n" too
            encoded = tokenizer(prefix, add_special_tokens=False, return_offsets_mapping=True)
            line_of = [max(k for k, a in enumerate(starts) if a <= o) for o, _ in encoded["offset_mapping"]]
            rows.append(ids + encoded["input_ids"])
            routes.append([experts[o] if o >= 0 else -1 for o in owners[:-1]] + [experts[0]] + [experts[k] for k in line_of])
        batch, routing = pad_left(rows, tokenizer.pad_token_id), pad_left(routes, -1)["input_ids"]
        mask, positions = batch["attention_mask"], position_ids(batch["attention_mask"])
        with model.route_tokens(routing):
            out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        current = torch.tensor([model.expert_ids([problems[c].tasks[i]])[0] for c, i in part]).view(-1, 1)
        generated = []
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].float().argmax(-1)  # [B]
            generated.append(token)
            mask = torch.cat([mask, torch.ones(len(part), 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
            with model.route_tokens(current):
                out = model(input_ids=token.view(-1, 1), attention_mask=mask, position_ids=positions, cache=out.cache, use_cache=True)
        rows = [row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
                for row in torch.stack(generated, 1).tolist()]  # cut at the end token
        texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
        for (c, i), text in zip(part, texts):
            answers[c][i] = fmt.answers(_prefix(problems[c], i) + text, n)[i]
    return answers


checkpoint, manifest, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
bench = load_benchmark(load_manifest(manifest), samples=30)
meteora = MeteoraModel.from_pretrained(checkpoint, base_model=copy.deepcopy(bench.base))
out = {"command": "cd benchmarks/results/chattasks/side_runs && python " + " ".join(sys.argv),
       "composites_per_n": 40, "shots": 0, "own expert, earlier answers given": {},
       "teacher-routed, earlier answers given": {}, "oracle": {}}
for n in (3, 5, 10):
    problems = composite_problems(bench.eval_sets, n, 40, bench.fmt)
    out["own expert, earlier answers given"][str(n)] = composite_summary(problems, gold_prefix_answers(meteora, bench, problems), bench.metrics)
    out["teacher-routed, earlier answers given"][str(n)] = composite_summary(
        problems, teacher_gold_prefix_answers(meteora, bench, problems), bench.metrics)
    out["oracle"][str(n)] = composite_oracle_scores(meteora, bench.tokenizer, problems, bench.metrics, bench.fmt)
    print(n, {k: v[str(n)]["summed"] for k, v in out.items() if isinstance(v, dict)}, flush=True)
json.dump(out, open(out_path, "w"), indent=1)
