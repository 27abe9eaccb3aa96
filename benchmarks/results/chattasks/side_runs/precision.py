"""Issue 17, build time on a CPU without AMX: an adapter's training under bf16 autocast (the frozen weights cast
once: the build's way) or in fp32, side by side, interleaved, twice each, in one thread as the build's workers
run. Per way: training seconds and the last step's loss.

    PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/precision.py [STEPS]
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
from suites.chattasks.items import adapter_items, task_data
from suites.chattasks.jobs import train_adapter
from suites.chattasks.smollm2 import smollm2_files

sys.path.insert(0, str(Path(__file__).parents[3]))  # benchmarks/
from bench_mixture import machine  # noqa: E402

TASK = "list_max"
WAYS = {"bf16 autocast": True, "fp32": False}


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    torch.set_num_threads(1)
    gguf = smollm2_files()[0]
    base, tokenizer, config = load_base_model(gguf).eval(), load_tokenizer(gguf), ChatTasksConfig()
    items = adapter_items(task_data(config), config)[TASK]
    seconds = {way: [] for way in WAYS}
    for _ in range(2):
        for way, bf16 in WAYS.items():
            started = time.perf_counter()
            train_adapter(base, tokenizer, dataclasses.replace(config, bf16=bf16), TASK, items, steps)
            seconds[way].append(round(time.perf_counter() - started, 1))
            print(way, seconds[way][-1], flush=True)
    medians = {way: statistics.median(s) for way, s in seconds.items()}
    out = {"command": f"PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/precision.py {steps}",
           "machine": machine(), "task": TASK, "steps": steps, "threads": 1, "train_seconds": seconds,
           "bf16_speedup_median": round(medians["fp32"] / medians["bf16 autocast"], 2)}
    Path(__file__).with_suffix(".json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out["bf16_speedup_median"]))


if __name__ == "__main__":
    main()
