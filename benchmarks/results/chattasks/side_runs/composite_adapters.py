"""Issue 17, composites: do the adapters themselves answer inside a composite? Perfect routing reached 2.3 of the
oracle's 9.4 at composite-10 (2.1 of 2.8 at composite-3). Here each adapter alone (PEFT, no gates) answers its own
line of the benchmark's composite-n prompts (2 shots, as in the benchmark) with every earlier line's gold answer
given, so neither routing nor earlier mistakes count: its accuracy in context against asked alone (the same
samples). Then adapters are retrained as the suite trains them with changes to its recipe (VARIANTS: composites of
up to 10 problems instead of 4, twice the steps, worked composites before each composite item) and measured the
same way, and on all their task's eval samples: the remedy to rebuild the suite with, if it closes the gap, and
what it costs to build. Entries of earlier calls are kept in the JSON (its "note" says
which).

    PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/composite_adapters.py [SUITE_DIR] [COUNT]
"""
import copy
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from peft import PeftModel

from meteora.evaluation import METRICS, composite_problems, composite_shots, load_benchmark, task_accuracy
from meteora.prompts import pad_left
from meteora.registry import load_manifest
from suites.chattasks import RECIPES, ChatTasksConfig
from suites.chattasks.items import adapter_items, task_data
from suites.chattasks.jobs import train_adapter

suite = Path(sys.argv[1] if len(sys.argv) > 1 else next((Path.home() / ".cache/meteora/suites").glob("chattasks-*")))
count = int(sys.argv[2]) if len(sys.argv) > 2 else 20  # lines asked per task and n
file = Path(__file__).with_suffix(".json")
OLD = [r.task for r in RECIPES[:10]]  # the first registration's tasks: the benchmark's composites draw from them
UP_TO_10 = "retrained, composites of up to 10"
VARIANTS = (  # (name, changes to the suite's ChatTasksConfig, times the recipe's steps, tasks; None: the worst two)
    (f"{UP_TO_10}, 1x the recipe's steps", {"composite_max": 10}, 1, None),
    (f"{UP_TO_10}, 2x the recipe's steps", {"composite_max": 10}, 2, None),
    (f"{UP_TO_10}, 2 worked composites before each, 1x the recipe's steps", {"composite_max": 10, "shots": 2}, 1,
     ["list_max"]),
)


@torch.no_grad()
def in_context(model, bench, task: str, n: int) -> tuple[float, float, list[str]]:
    """(accuracy on task's line of composite-n prompts with the earlier lines' gold answers, accuracy on the same
    samples asked alone, the answers in context)."""
    shots = composite_shots(bench.eval_sets, n, 2, bench.fmt)
    problems = composite_problems(bench.eval_sets, n, -(-count * len(OLD) // n), bench.fmt)  # each task ~count times
    asked = [(p, p.tasks.index(task)) for p in problems if task in p.tasks]
    rows, prefixes = [], []
    for problem, i in asked:
        prefix = "".join(f"{k + 1}. {s['response']}\n" for k, s in enumerate(problem.samples[:i])) + f"{i + 1}."
        rows.append(bench.fmt.prompt_ids(bench.tokenizer, problem.joined.prompt, shots)
                    + bench.tokenizer(prefix, add_special_tokens=False)["input_ids"])
        prefixes.append(prefix)
    batch = pad_left(rows, bench.tokenizer.pad_token_id)
    out = model.generate(**batch, max_new_tokens=32, do_sample=False, pad_token_id=bench.tokenizer.pad_token_id,
                         eos_token_id=bench.tokenizer.eos_token_id)
    texts = bench.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    metric = METRICS[bench.metrics[task]]
    answers = [bench.fmt.answers(prefix + text, n)[i] for (_, i), prefix, text in zip(asked, prefixes, texts)]
    scores = [metric(answer, p.samples[i]["response"]) for (p, i), answer in zip(asked, answers)]
    alone = task_accuracy(model, bench.tokenizer, [p.samples[i] for p, i in asked], bench.fmt, bench.metrics[task])
    return sum(scores) / len(scores), alone, answers


def measure(model, bench, task: str) -> dict:
    result = {}
    for n in (3, 10):
        started = time.perf_counter()
        context, alone, answers = in_context(model, bench, task, n)
        (common, times), = Counter(answers).most_common(1)  # an answer repeated whatever the question: copied
        result[str(n)] = {"in_context": round(context, 3), "alone": round(alone, 3),
                          "most_common_answer": common, "its_share": round(times / len(answers), 2)}
        print(f"  {task} composite-{n}: in context {context:.2f}, alone {alone:.2f} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    return result


def retrain(bench, task: str, changes: dict, steps_factor: int) -> tuple[object, float]:
    """task's adapter trained as the suite trains it, with `changes` to its config and steps_factor x its steps."""
    config = ChatTasksConfig(**changes)
    items = adapter_items(task_data(config), config)[task]
    started = time.perf_counter()
    steps = config.recipes[config.tasks.index(task)].steps * steps_factor
    model = train_adapter(bench.base, bench.tokenizer, config, task, items, steps)
    return model, time.perf_counter() - started


def main() -> None:
    bench = load_benchmark(load_manifest(str(suite / "manifest.yaml")), tasks=OLD)
    results = json.loads(file.read_text()) if file.exists() else {}
    suite_adapters = results.setdefault("suite adapters (composites of up to 4)", {})
    for task in OLD:
        if task not in suite_adapters:
            model = PeftModel.from_pretrained(copy.deepcopy(bench.base), bench.adapters[task]).eval()
            suite_adapters[task] = measure(model, bench, task)
            file.write_text(json.dumps(results, indent=2))
    worst = sorted(OLD, key=lambda t: suite_adapters[t]["10"]["in_context"])[:2]
    for name, changes, factor, tasks in VARIANTS:
        variant = results.setdefault(name, {})
        for task in tasks or worst:
            if task not in variant:
                model, seconds = retrain(bench, task, changes, factor)
                own = task_accuracy(model, bench.tokenizer, bench.eval_sets[task], bench.fmt, bench.metrics[task])
                variant[task] = {**measure(model, bench, task), "own_eval": round(own, 3), "train_seconds": round(seconds, 1)}
                file.write_text(json.dumps(results, indent=2))
    results["command"] = ("PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/composite_adapters.py "
                          f"[SUITE_DIR] {count}")
    results["lines_per_task_and_n"] = count
    file.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
