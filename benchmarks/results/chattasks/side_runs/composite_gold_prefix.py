"""Composites with every earlier answer given: how much of the gap between perfect routing and the oracle is the
adapters inside a long context, and how much their own earlier mistakes. On the 40 composites per n of
`composites_40.py` (0-shot, the same checkpoint and samples), each sub-problem i is answered by its own expert
alone (all tokens forced to it) after the prompt and the gold answers "1. ..." to "i-1. ..." and "i.", and cut at
its line; summed per composite as the benchmark sums. Beside it the oracle (each problem asked alone with its
expert) on the same composites. Earlier side run (`composite_adapters.py`) did this 2-shot, with fewer lines."""
import copy
import json
import sys
from collections import defaultdict

import torch

from meteora import MeteoraModel
from meteora.evaluation import composite_problems, load_benchmark
from meteora.evaluation.answers import composite_oracle_scores, composite_summary
from meteora.prompts import pad_left, to_device
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
                prefixes = ["".join(f"{k + 1}. {s['response']}\n" for k, s in enumerate(problems[c].samples[:i])) + f"{i + 1}."
                            for c, i in part]
                rows = [fmt.prompt_ids(tokenizer, problems[c].joined.prompt) + tokenizer(p, add_special_tokens=False)["input_ids"]
                        for (c, _), p in zip(part, prefixes)]
                batch = to_device(pad_left(rows, tokenizer.pad_token_id), model.device)
                out = model.generate(**batch, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
                texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
                for (c, i), prefix, text in zip(part, prefixes, texts):
                    answers[c][i] = fmt.answers(prefix + text, n)[i]
    return answers


checkpoint, manifest, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
bench = load_benchmark(load_manifest(manifest), samples=30)
meteora = MeteoraModel.from_pretrained(checkpoint, base_model=copy.deepcopy(bench.base))
out = {"command": "cd benchmarks/results/chattasks/side_runs && python " + " ".join(sys.argv),
       "composites_per_n": 40, "shots": 0, "own expert, earlier answers given": {}, "oracle": {}}
for n in (3, 5, 10):
    problems = composite_problems(bench.eval_sets, n, 40, bench.fmt)
    out["own expert, earlier answers given"][str(n)] = composite_summary(problems, gold_prefix_answers(meteora, bench, problems), bench.metrics)
    out["oracle"][str(n)] = composite_oracle_scores(meteora, bench.tokenizer, problems, bench.metrics, bench.fmt)
    print(n, {k: out[k][str(n)]["summed"] for k in ("own expert, earlier answers given", "oracle")}, flush=True)
json.dump(out, open(out_path, "w"), indent=1)
