"""Issue 18 at 100 eval samples per task (one sample = 1 point), on a finished `make demo MODEL=smollm2` output:
the demo's increment (+last_first, +snake_label, 60 steps, every row trained) against the same increment with the
copied rows frozen (trained here with train_gates.py, the demo's other settings, the code as it is), both against
the first registration and the own adapters, MeteoRA top-2 on the same 100 samples per task. Variants measured by
earlier calls are kept in the JSON (the code changed between them: LABEL names what this call's run is).

    PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/increment_100.py [DEMO_OUTPUT] [WORK] [LABEL] [STEPS]
"""
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

from meteora import MeteoraModel
from meteora.evaluation import accuracy_per_task, load_benchmark, task_accuracy
from meteora.registry import load_manifest

ROOT = Path(__file__).parents[4]
demo = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "demo-output")
work = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/real/increment_100")
state = json.loads((demo / "workflow_state.json").read_text())
every_row = Path(state["train"]["outputs"]["checkpoint"])
first = Path(MeteoraModel.from_pretrained(every_row).training_summary["warm_start"]["init_from"])
experts = [name for name, _ in state["train"]["outputs"]["experts"]]
frozen = work / "checkpoint"
label = sys.argv[3] if len(sys.argv) > 3 else "frozen"
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 60
file = Path(__file__).with_suffix(".json")


def train_frozen() -> None:
    """The demo's increment again, copied rows frozen (demo: batch 16, bf16, composites 25%; its steps: 30% of 200)."""
    subprocess.run([sys.executable, str(ROOT / "pipelines" / "train_gates.py"), f"registry={demo / 'store' / 'registry'}",
                    f"experts=[{', '.join(experts)}]", f"init_from={first}", "freeze_old=true", f"steps={steps}", "batch=16",
                    "num_workers=2", "cpus_per_worker=1", "precision=bf16", "composite_fraction=0.25",
                    "name=freeze-old", f"storage_path={work / 'runs'}", f"output={frozen}"], check=True)


def main() -> None:
    if not (frozen / "meteora_config.json").exists():
        train_frozen()
    bench = load_benchmark(load_manifest(str(demo / "store" / "more.yaml")), samples=100)
    earlier = json.loads(file.read_text()) if file.exists() else {}
    table, seconds = earlier.get("per_task_top2", {}), earlier.get("train_seconds", {})
    checkpoints = {**earlier.get("checkpoints", {}), "first": str(first), "every row": str(every_row), label: str(frozen)}
    for name in ("first", "every row", label):
        if name in table and name != label:
            continue
        model = MeteoraModel.from_pretrained(checkpoints[name], base_model=copy.deepcopy(bench.base))
        model.configure(top_k=2)
        sets = {task: samples for task, samples in bench.eval_sets.items() if task in model.expert_names}
        started = time.perf_counter()
        table[name] = accuracy_per_task(model, bench.tokenizer, sets, bench.fmt, bench.metrics)
        seconds[name] = model.training_summary["train_seconds"]
        print(name, table[name], f"({time.perf_counter() - started:.0f} s)", flush=True)
    if "own adapter" not in table:
        own = MeteoraModel.from_adapters(copy.deepcopy(bench.base), bench.adapters, top_k=1, prompt_format=bench.fmt.name)
        table["own adapter"] = {}
        for task, samples in bench.eval_sets.items():
            with own.force_experts([task]):
                table["own adapter"][task] = task_accuracy(own, bench.tokenizer, samples, bench.fmt, bench.metrics[task])
        print("own adapter", table["own adapter"], flush=True)
    old, new = list(table["first"]), [t for t in experts if t not in table["first"]]
    summary = {name: {"old_tasks_points_vs_first": {t: round(100 * (table[name][t] - table["first"][t])) for t in old},
                      "new_tasks_vs_own": {t: round(table[name][t] / table["own adapter"][t], 3) for t in new},
                      "time_vs_first": round(seconds[name] / seconds["first"], 3)}
               for name in checkpoints if name != "first"}
    out = {"command": "PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/increment_100.py "
                      "[DEMO_OUTPUT] [WORK] [LABEL] [STEPS] (after rm -rf ~/.cache/meteora demo-output; make demo MODEL=smollm2)",
           "samples_per_task": 100, "checkpoints": checkpoints,
           "train_seconds": seconds, "per_task_top2": table, "summary": summary}
    file.write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
