"""Issue 17, build time: the same adapters trained one after the other in one process of 2 threads (the build
before) or at once in 2 processes of 1 thread each (the build's job workers now), side by side, twice each.
Per way: each adapter's training seconds (the base loaded first, not counted) and the wall time of both.

    PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/parallel_build.py SUITE_DIR [STEPS]
"""
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[3]))  # benchmarks/
from bench_mixture import machine  # noqa: E402

TASKS = ("list_max", "int_commas")
WAYS = {"one process of 2 threads, one after the other": (1, 2), "2 processes of 1 thread, at once": (2, 1)}


def train(suite: Path, task: str, threads: int, steps: int) -> float:
    import torch

    torch.set_num_threads(threads)
    from meteora import load_base_model, load_tokenizer
    from suites.chattasks import ChatTasksConfig
    from suites.chattasks.items import adapter_items, task_data
    from suites.chattasks.jobs import train_adapter

    gguf = next((suite / "base").glob("*.gguf"))
    base, tokenizer, config = load_base_model(gguf).eval(), load_tokenizer(gguf), ChatTasksConfig()
    items = adapter_items(task_data(config), config)[task]
    started = time.perf_counter()
    train_adapter(base, tokenizer, config, task, items, steps)
    return time.perf_counter() - started


def main() -> None:
    suite, steps = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 6
    runs = {way: [] for way in WAYS}
    for _ in range(2):
        for way, (processes, threads) in WAYS.items():
            started = time.perf_counter()
            with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(train, suite, task, threads, steps) for task in TASKS]
                seconds = [f.result() for f in futures]
            training = sum(seconds) if processes == 1 else max(seconds)
            runs[way].append({"train_seconds": [round(s, 1) for s in seconds], "both_trained_in": round(training, 1),
                              "wall": round(time.perf_counter() - started, 1)})
            print(way, runs[way][-1], flush=True)
    medians = {way: statistics.median(r["both_trained_in"] for r in rs) for way, rs in runs.items()}
    before, now = medians.values()
    out = {"command": "PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/parallel_build.py "
                      f"SUITE_DIR {steps}",
           "machine": machine(), "suite": suite.name, "tasks": TASKS, "steps": steps, "runs": runs,
           "speedup_median": round(before / now, 2)}
    Path(__file__).with_suffix(".json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out["speedup_median"]))


if __name__ == "__main__":
    main()
