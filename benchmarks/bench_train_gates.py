"""The SGD loop (method=sgd) with Ray Train on the embedded tinytasks benchmark: quality, incremental training, scaling.

One run, on a local Ray started here, every training through pipelines/train_gates.train:
  full         all 8 adapters, `--workers` workers, `--steps` steps -> evaluated by the harness: per task
               (base, own adapter = oracle, LoRA-B, merged, MeteoRA top-1/2) and composite-3/5, with plots
  six          the first 6 adapters, the same steps                      -> MeteoRA top-2 per task
  incremental  --init-from six's checkpoint, + the last 2 adapters (every gate row trains; the new ones start
               fresh), `--incremental` of the steps, each expert's data equally often -> MeteoRA top-2 per task
  scaling      `--scaling-steps` steps with 1 and with 2 workers: training samples/s (startup excluded)
Writes benchmarks/results/train_gates/{results.json, results.md, accuracy.png, routing.png}.

    python benchmarks/bench_train_gates.py [--steps 1000] [--composite-fraction 0] [--incremental 0.25]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path

import ray
import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from meteora_moe import MeteoraModel  # noqa: E402
from meteora_moe.evaluation import CompositeSettings, accuracy_per_task, evaluate, load_benchmark, markdown_table  # noqa: E402
from meteora_moe.registry import Registry, load_manifest  # noqa: E402
from pipelines.ray_env import LOCAL_RAY  # noqa: E402
from pipelines.train_config import load_train_config  # noqa: E402
from pipelines.train_gates import embedded_registry, train  # noqa: E402
from suites.tinytasks import build  # noqa: E402


def run(args, storage: str, registry: str, name: str, **settings) -> tuple[dict, float]:
    values = {"registry": registry, "storage_path": storage, "name": f"{name}-{uuid.uuid4().hex[:6]}",
              "method": "sgd", "num_workers": args.workers, "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "composite_fraction": args.composite_fraction, "checkpoint_every": max(1, args.steps // 10), **settings}
    started = time.perf_counter()
    summary = train(load_train_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()]))
    return summary, time.perf_counter() - started


def top2_accuracy(bench, checkpoint: str, tasks: list[str]) -> dict[str, float]:
    model = MeteoraModel.from_pretrained(checkpoint, base_model=copy.deepcopy(bench.base))
    model.configure(top_k=2)
    return accuracy_per_task(model, bench.tokenizer, {t: bench.eval_sets[t] for t in tasks}, bench.fmt, bench.metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--composite-fraction", type=float, default=0.0)
    parser.add_argument("--incremental", type=float, default=0.25, help="incremental steps as a share of --steps")
    parser.add_argument("--scaling-steps", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_gates"))
    args = parser.parse_args()
    out, storage = Path(args.out), str(Path(args.out).resolve().parent / ".ray_results")
    ray.init(**LOCAL_RAY)
    manifest, registry = build(), embedded_registry()
    tasks = Registry(registry).names
    bench = load_benchmark(Registry(registry), baselines=[b.name for b in load_manifest(manifest).baselines])

    scaling = {}
    for workers in (1, 2):
        summary, wall = run(args, storage, registry, f"scaling{workers}", num_workers=workers, steps=args.scaling_steps,
                            checkpoint_every=args.scaling_steps)
        scaling[workers] = {"samples_per_s": summary["samples_per_s"], "train_seconds": summary["train_seconds"], "job_seconds": round(wall, 1)}
        print(f"scaling: {workers} worker(s) {summary['samples_per_s']} samples/s", flush=True)

    full, full_wall = run(args, storage, registry, "full")
    results = evaluate(bench, full["output"], CompositeSettings(sizes=(3, 5), count=40), out_dir=out)
    six, six_wall = run(args, storage, registry, "six", experts=tasks[:6])
    incremental, incremental_wall = run(args, storage, registry, "incremental", init_from=six["output"],
                                        steps=max(1, round(args.incremental * args.steps)))
    six_accuracy, incremental_accuracy = top2_accuracy(bench, six["output"], tasks[:6]), top2_accuracy(bench, incremental["output"], tasks)
    oracle = results["per_task"]["own adapter"]
    report = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "device": "CPU"},
        "settings": vars(args),
        "full": {"train_seconds": full["train_seconds"], "job_seconds": round(full_wall, 1), "samples_per_s": full["samples_per_s"],
                 "eval_routing_accuracy": full["final"]["eval_routing_accuracy"], "checkpoint": full["output"],
                 "per_task": results["per_task"], "composite": results["composite"]},
        "incremental": {
            "old_tasks": tasks[:6], "new_tasks": tasks[6:],
            "six_top2": six_accuracy, "incremental_top2": incremental_accuracy, "oracle": oracle,
            "old_task_change_points": {t: round(100 * (incremental_accuracy[t] - six_accuracy[t]), 1) for t in tasks[:6]},
            "vs_full_training_points": {t: round(100 * (incremental_accuracy[t] - results["per_task"]["meteora top-2"][t]), 1)
                                        for t in tasks},
            "new_task_share_of_oracle": {t: round(incremental_accuracy[t] / oracle[t], 3) if oracle[t] else None for t in tasks[6:]},
            "train_seconds": {"six": six["train_seconds"], "incremental": incremental["train_seconds"], "full": full["train_seconds"]},
            "time_share_of_full": round(incremental["train_seconds"] / full["train_seconds"], 3),
            "job_seconds": {"six": round(six_wall, 1), "incremental": round(incremental_wall, 1)},
        },
        "scaling": scaling,
    }
    (out / "results.json").write_text(json.dumps({**report, "routing_example": results["routing_example"]}, indent=2))
    (out / "results.md").write_text(summary_markdown(report))
    print(summary_markdown(report))


def summary_markdown(report: dict) -> str:
    full, inc, scaling = report["full"], report["incremental"], report["scaling"]
    lines = [f"`{report['command']}` on {report['machine']['cores']} CPU cores", "",
             f"Full training: {full['train_seconds']} s of training ({full['job_seconds']} s job), routing accuracy on eval "
             f"response tokens {full['eval_routing_accuracy']:.3f}", "",
             markdown_table(full["per_task"], full["composite"]), "",
             "| incremental (top-2) | " + " | ".join(inc["old_tasks"] + inc["new_tasks"]) + " |",
             "|---" * (len(inc["old_tasks"] + inc["new_tasks"]) + 1) + "|",
             "| 6 adapters | " + " | ".join(f"{inc['six_top2'][t]:.2f}" for t in inc["old_tasks"]) + " | - | - |",
             "| +2 with --init-from | " + " | ".join(f"{inc['incremental_top2'][t]:.2f}" for t in inc["old_tasks"] + inc["new_tasks"]) + " |",
             "| 8 from scratch (full) | " + " | ".join(f"{full['per_task']['meteora top-2'][t]:.2f}" for t in inc["old_tasks"] + inc["new_tasks"]) + " |",
             "| oracle | " + " | ".join(f"{inc['oracle'][t]:.2f}" for t in inc["old_tasks"] + inc["new_tasks"]) + " |", "",
             f"Incremental training time: {inc['train_seconds']['incremental']} s = {inc['time_share_of_full']:.2f}x the full "
             f"training's {inc['train_seconds']['full']} s", "",
             "| workers | samples/s (training) | job seconds |", "|---|---|---|"]
    lines += [f"| {w} | {s['samples_per_s']} | {s['job_seconds']} |" for w, s in scaling.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
