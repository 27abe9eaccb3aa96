"""Composite remedy, adapter side: does an adapter trained with composites of up to 10 problems (instead of 4)
answer its problem inside a composite-10 prompt better? Each of the suite's first 10 adapters alone (PEFT), its
problem asked among the 9 others' with their answers given (the context the adapters are trained on: what perfect
routing would see if every other expert answered right), 0-shot and 2-shot as the benchmark asks; then the
WORST adapters trained again with composite_max=10 (same recipe, seed, steps) and asked the same.

    PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/composite_adapters.py [WORST=2] [COUNT=20]
"""
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel

from meteora import load_base_model, load_tokenizer
from meteora.evaluation.answers import composite_problems, composite_shots
from meteora.evaluation.metrics import exact_match
from meteora.prompts import pad_left
from meteora.registry import load_manifest
from suites.chattasks import RECIPES, ChatTasksConfig, build, lora, split_samples
from suites.chattasks.build import CHAT, _items

WORST = int(sys.argv[1]) if len(sys.argv) > 1 else 2
COUNT = int(sys.argv[2]) if len(sys.argv) > 2 else 20
OUT = Path("/tmp/real/composite_adapters")


@torch.no_grad()
def in_context_accuracy(model, tokenizer, problems, task: str, shots) -> float:
    """Exact match of `task`'s answer in each composite, the answers before it given (greedy, batched)."""
    prefixes, references = [], []
    for problem in problems:
        own = problem.tasks.index(task)
        given = problem.joined.response[:problem.joined.response_spans[own][0]]
        prefixes.append(CHAT.render(tokenizer, problem.joined.prompt, shots) + given)
        references.append((own, given, problem.samples[own]["response"], len(problem.tasks)))
    correct = 0.0
    for start in range(0, len(prefixes), 8):
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prefixes[start:start + 8]]
        batch = pad_left(rows, tokenizer.pad_token_id)
        out = model.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        for text, (own, given, reference, n) in zip(tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                                           skip_special_tokens=True),
                                                    references[start:start + 8]):
            correct += exact_match(CHAT.answers(given + text, n)[own], reference)
    return correct / len(prefixes)


def measure(base, tokenizer, adapter: Path, task: str, eval_sets, shot_sets) -> dict:
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    problems = composite_problems(eval_sets, 10, COUNT, CHAT)
    return {f"{k}-shot": round(in_context_accuracy(model, tokenizer, problems, task, shots), 3) for k, shots in shot_sets.items()}


def main() -> None:
    manifest = load_manifest(build())
    suite = Path(manifest.path).parent
    tokenizer, base = load_tokenizer(manifest.base_uri), load_base_model(manifest.base_uri).eval()
    tasks = [r.task for r in RECIPES[:10]]
    eval_sets = {t: [json.loads(line) for line in (suite / "data" / t / "eval.jsonl").read_text().splitlines()] for t in tasks}
    shot_sets = {0: (), 2: composite_shots(eval_sets, 10, 2, CHAT)}
    old = {}
    for task in tasks:
        started = time.perf_counter()
        old[task] = measure(base, tokenizer, suite / "adapters" / task, task, eval_sets, shot_sets)
        print("old", task, old[task], f"{time.perf_counter() - started:.0f} s", flush=True)
    worst = sorted(tasks, key=lambda t: old[t]["2-shot"])[:WORST]
    config = ChatTasksConfig(composite_max=10)
    data = {t: split_samples(t, config.n_train, config.n_eval, config.seed) for t in config.tasks}
    items = _items(data, config)
    new = {}
    for task in worst:
        i = config.tasks.index(task)
        recipe = config.recipes[i]
        started = time.perf_counter()
        model = lora.lora_model(base, recipe.rank, recipe.targets, recipe.rslora, config.seed + i)
        lora.train(model, tokenizer, CHAT, items[task], recipe.steps, config.lr, config.batch, config.seed + i, config.bf16)
        model.save_pretrained(OUT / task)
        trained = time.perf_counter() - started
        new[task] = {**measure(base, tokenizer, OUT / task, task, eval_sets, shot_sets), "train_seconds": round(trained)}
        print("composite_max=10", task, new[task], flush=True)
    result = {"command": "PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/composite_adapters.py "
                         f"{WORST} {COUNT}", "composites": COUNT, "n": 10,
              "config": {"old": dataclasses.asdict(ChatTasksConfig())["composite_max"], "new": 10},
              "old_adapters": old, "retrained": new}
    Path(__file__).with_suffix(".json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
