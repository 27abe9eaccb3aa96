"""Issue 17, build time: how a batch of 16 is cut into training passes (lora.step_gradients: the same gradients
every way, less padding computed in smaller passes, a fixed cost per pass). Fixed counts of rows of about one
length, or the cheapest cuts (lora.passes) for a pass's fixed cost of 20, 40 or 80 row-tokens. An adapter
trained each way, side by side, interleaved, twice each after an untimed warm-up, in one thread as the build's
workers run, in the precision the build picks here. Per way: training seconds.

    PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/passes.py [STEPS]
"""
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from meteora import load_base_model, load_tokenizer
from suites.chattasks import ChatTasksConfig
from suites.chattasks import lora
from suites.chattasks.items import adapter_items, task_data
from suites.chattasks.jobs import train_adapter
from suites.chattasks.smollm2 import smollm2_files

sys.path.insert(0, str(Path(__file__).parents[3]))  # benchmarks/
from bench_mixture import machine  # noqa: E402

TASK = "dedupe_words"
CHEAPEST = lora.passes


def rows_of(count: int):
    return lambda lengths, cost: [slice(i, i + count) for i in range(0, len(lengths), count)]


WAYS = {"8 rows a pass": (rows_of(8), 0), "4 rows a pass": (rows_of(4), 0),
        **{f"cheapest cuts, pass cost {cost}": (CHEAPEST, cost) for cost in (20, 40, 80)}}


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    torch.set_num_threads(1)
    gguf = smollm2_files()[0]
    base, tokenizer, config = load_base_model(gguf).eval(), load_tokenizer(gguf), ChatTasksConfig()
    items = adapter_items(task_data(config), config)[TASK]
    train_adapter(base, tokenizer, config, TASK, items, 1)  # warm-up
    seconds = {way: [] for way in WAYS}
    for _ in range(2):
        for way, (cut, cost) in WAYS.items():
            lora.passes = cut
            started = time.perf_counter()
            train_adapter(base, tokenizer, dataclasses.replace(config, pass_cost=cost), TASK, items, steps)
            seconds[way].append(round(time.perf_counter() - started, 1))
            print(way, seconds[way][-1], flush=True)
    medians = {way: statistics.median(s) for way, s in seconds.items()}
    first = medians["8 rows a pass"]
    out = {"command": f"PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/passes.py {steps}",
           "machine": machine(), "task": TASK, "steps": steps, "threads": 1, "bf16": config.bf16,
           "train_seconds": seconds, "speedup_median_over_8_rows": {w: round(first / m, 2) for w, m in medians.items()}}
    Path(__file__).with_suffix(".json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out["speedup_median_over_8_rows"], indent=1))


if __name__ == "__main__":
    main()
