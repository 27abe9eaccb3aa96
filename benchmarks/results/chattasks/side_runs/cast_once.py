"""Issue 17, build time: an adapter's training under bf16 autocast with the frozen linear weights in fp32 (autocast
casts them to bf16 in every pass: the build before) or cast to bf16 once for the whole training (the build now,
lora.frozen_weights_in_bf16: the same values, so the same adapter bit for bit), side by side, interleaved, in one
thread as the build's workers run. Per way: training seconds; and whether the two adapters are equal.

    PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/cast_once.py SUITE_DIR [STEPS]
"""
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model_state_dict

from meteora import load_base_model, load_tokenizer
from suites.chattasks import ChatTasksConfig
from suites.chattasks import lora
from suites.chattasks.items import adapter_items, task_data
from suites.chattasks.jobs import train_adapter

sys.path.insert(0, str(Path(__file__).parents[3]))  # benchmarks/
from bench_mixture import machine  # noqa: E402

TASK = "list_max"
CAST_ONCE = lora.frozen_weights_in_bf16
WAYS = {"autocast casts the frozen weights in every pass (before)": lambda model: contextlib.nullcontext(),
        "frozen weights cast to bf16 once (now)": CAST_ONCE}


def main() -> None:
    suite, steps = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 6
    torch.set_num_threads(1)
    gguf = next((suite / "base").glob("*.gguf"))
    base, tokenizer, config = load_base_model(gguf).eval(), load_tokenizer(gguf), ChatTasksConfig()
    items = adapter_items(task_data(config), config)[TASK]
    seconds, adapters = {way: [] for way in WAYS}, {}
    for _ in range(2):
        for way, cast in WAYS.items():
            lora.frozen_weights_in_bf16 = cast
            started = time.perf_counter()
            model = train_adapter(base, tokenizer, config, TASK, items, steps)
            seconds[way].append(round(time.perf_counter() - started, 1))
            adapters[way] = get_peft_model_state_dict(model)
            print(way, seconds[way][-1], flush=True)
    before, now = (adapters[way] for way in WAYS)
    medians = [statistics.median(s) for s in seconds.values()]
    out = {"command": f"PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/cast_once.py SUITE_DIR {steps}",
           "machine": machine(), "suite": suite.name, "task": TASK, "steps": steps, "threads": 1,
           "train_seconds": seconds, "speedup_median": round(medians[0] / medians[1], 2),
           "same_adapter_bits": all(torch.equal(before[k], now[k]) for k in before)}
    Path(__file__).with_suffix(".json").write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("speedup_median", "same_adapter_bits")}))


if __name__ == "__main__":
    main()
