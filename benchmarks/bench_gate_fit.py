"""Fitted gates against the paper's SGD loop on the real model (chattasks on SmolLM2-135M-Instruct), side by side
in one run: one registry, one evaluation.

  methods       the first 10 adapters: fit and fit+sgd (the fit, then --refine-steps of the loop) with 2 Ray Train
                workers, the fit also with 1; sgd (bench-real's recipe: --sgd-steps x 16, lr 0.01, a quarter
                composites) with each of --sgd-workers (default 2, then 1 of 2 CPUs; the first evaluated).
                Wall time of the training and of the whole job, peak memory of a worker, routing accuracy on eval
                responses, per task MeteoRA top-1 / top-2 and composite-3/5/10 (--composites per n). The fit's
                evaluation also scores the baselines (base, own adapters, LoRA-B, merged, perfect routing).
  registration  +2 adapters on MLP projections (modules no first adapter targets) from the fit's checkpoint: only
                their rows fitted (old rows held: checked bit for bit), guarded (fit_guard), with 1 worker of 2
                CPUs and timed again with 2 of 1; the 1-worker one evaluated: new tasks against their own
                adapters, old tasks against the first fit on --old-samples eval samples each
  init          a fresh row at 0 steps of SGD, four ways: the mean of the old rows (the SGD warm start), a difference
                of class means, Arrow's prototype (the top right singular vector of B A), the fit (the registration's,
                guarded): routing accuracy
                on eval responses, per task top-2
Writes benchmarks/results/gate_fit/: results.json (command, machine), results.md, fit_per_depth.png.

    python benchmarks/bench_gate_fit.py [--sgd-steps 300] [--refine-steps 60] [--composites 40] [--resume]
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import ray  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bench_chattasks import manifests  # noqa: E402
from bench_mixture import machine  # noqa: E402
from meteora_moe import MeteoraModel, load_tokenizer  # noqa: E402
from meteora_moe.evaluation import CompositeSettings, accuracy_per_task, evaluate, load_benchmark, markdown_table  # noqa: E402
from meteora_moe.registry import Registry, load_manifest  # noqa: E402
from meteora_moe.training import (GateTrainingConfig, fit_gates, fit_items, init_gates_from, registry_samples,  # noqa: E402
                              response_routing_accuracy, shuffled, solve_gates)
from pipelines.collect_adapters import collect  # noqa: E402
from pipelines.ray_env import LOCAL_RAY  # noqa: E402
from pipelines.train_config import load_train_config  # noqa: E402
from pipelines.train_gates import train  # noqa: E402
from suites.chattasks import build  # noqa: E402

FIRST = 10  # the first registration; the last 2 adapters of the suite are the increment
RECIPE = {"batch": 16, "lr": 0.01, "composite_fraction": 0.25, "precision": "fast", "checkpoint_every": 50}


class Stages:
    """Each stage's result in <work>/stages.json: --resume skips the stages a run finished."""

    def __init__(self, work: Path, resume: bool):
        self.file = work / "stages.json"
        self.done = json.loads(self.file.read_text()) if resume and self.file.exists() else {}

    def run(self, name: str, action):
        if name not in self.done:
            print(f"[{name}] running", flush=True)
            started = time.perf_counter()
            self.done[name] = action()
            self.file.write_text(json.dumps(self.done, indent=2))
            print(f"[{name}] done in {time.perf_counter() - started:.0f} s", flush=True)
        return self.done[name]


def train_job(registry: str, work: Path, name: str, experts: list[str], **values) -> dict:
    """One train_gates job on the local Ray; its summary, with the job's wall seconds."""
    settings = {"registry": registry, "storage_path": str(work / "runs"), "name": name, "experts": experts, **RECIPE, **values}
    started = time.perf_counter()
    summary = train(load_train_config(None, [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in settings.items()]))
    return {**summary, "job_seconds": round(time.perf_counter() - started, 1)}


def method_row(summary: dict) -> dict:
    fit = summary.get("fit") or {}
    return {"method": summary["method"], "workers": summary["num_workers"], "steps": summary["steps"],
            "train_seconds": summary["train_seconds"], "fit_seconds": fit.get("seconds"), "job_seconds": summary["job_seconds"],
            "peak_rss_mb_per_worker": summary["peak_rss_mb"],
            "eval_routing_accuracy_256": (summary.get("final") or {}).get("eval_routing_accuracy"),
            "checkpoint": summary["output"]}


def evaluated(registry: Registry, tasks: list[str], checkpoint: str, out: Path, samples: int, composites: int,
              baselines: bool) -> dict:
    bench = load_benchmark(registry, tasks, list(registry.index.get("baselines", {})) if baselines else [], samples)
    settings = CompositeSettings((3, 5, 10) if composites else (), composites or 1)
    results = evaluate(bench, checkpoint, settings, out, baselines=baselines)
    return {key: results[key] for key in ("per_task", "composite", "routing_accuracy")}


def gates(checkpoint: str) -> dict[str, torch.Tensor]:
    return load_file(Path(checkpoint) / "gates.safetensors")


# ---- initialising a fresh row -----------------------------------------------------------------------------------
def scaled_rows(directions: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, gate: torch.Tensor,
                rows: list[int]) -> torch.Tensor:
    """directions [n, d_in] as the gate's rows `rows`, each with its sign and scale fitted from the data: the scales
    c [n] minimising the module's CE with the other rows held (convex in c), each sign making its own tokens
    score higher than the others'."""
    x, gate = x.float(), gate.detach().float()
    for i, row in enumerate(rows):
        own = labels == row
        if own.any() and (~own).any() and (x[own] @ directions[i]).mean() < (x[~own] @ directions[i]).mean():
            directions[i] = -directions[i]
    fixed, index = x @ gate.t(), torch.tensor(rows)
    projected = x @ directions.t()  # [N, n]
    scales = torch.zeros(len(rows), requires_grad=True)
    optimizer = torch.optim.LBFGS([scales], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(fixed.index_copy(1, index, projected * scales), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return scales.detach()[:, None] * directions


NO_STATS = {"accuracy": float("nan"), "iterations": 0, "seconds": 0.0}


def per_gate(direction_rule):
    """A solver with solve_gates' signature from direction_rule(x, labels, gate, row) -> [d_in]: each fresh row that
    direction, its sign and scale fitted from the data (scaled_rows)."""
    def solve(x, labels, gates, rows, l2, iterations, collective, guard=None):  # unguarded: an initialisation
        x = x.float()
        fitted = [scaled_rows(torch.stack([direction_rule(x, labels, gate, row) for row in r]), x, labels, gate, list(r))
                  for gate, r in zip(gates, rows)]
        return fitted, [NO_STATS] * len(gates)

    return solve


def class_mean_difference(x, labels, gate, row) -> torch.Tensor:
    """The row's task's mean input minus the other tasks' (0 for a task with no tokens here)."""
    own = labels == row
    return x[own].mean(0) - x[~own].mean(0) if own.any() else torch.zeros(x.shape[1])


def arrow_prototype(model: MeteoraModel):
    """Arrow's prototype: the top right singular vector of the expert's B A at this module; 0 where the expert has
    no factors (Arrow has no vector there)."""
    layers = {layer.meteora_gate.data_ptr(): layer for layer in model.layers.values()}

    def direction(x, labels, gate, row) -> torch.Tensor:
        A, B_t = layers[gate.data_ptr()].meteora_experts.expert(row)  # [r, d_in], [r, d_out] (scaling folded in)
        if A.shape[0] == 0:
            return torch.zeros(x.shape[1])
        return torch.linalg.svd(B_t.float().t() @ A.float(), full_matrices=False)[2][0]  # B A = U S V^T: V's first row

    return direction


def initialisations(registry: Registry, first_checkpoint: str, names: list[str], samples: int) -> dict:
    """Each way of starting the 2 fresh rows from the first fit's checkpoint, at 0 steps of SGD."""
    base_uri = registry.base_model["uri"]
    tokenizer = load_tokenizer(base_uri)
    config = GateTrainingConfig(composite_fraction=RECIPE["composite_fraction"])
    train_samples = registry_samples(registry, names, "train")
    evaluation = shuffled(registry_samples(registry, names, "eval"), 0)[:256]
    eval_sets = {name: [s for s, e in registry_samples(registry, [name], "eval")][:samples] for name in names}
    rows = {}
    for how in ("mean of old rows", "class means", "arrow", "fit"):
        model = MeteoraModel.from_adapters(base_uri, registry.adapter_dirs(names), prompt_format="chat").eval()
        warm = init_gates_from(model, first_checkpoint)  # copied rows, and fresh rows at the old rows' mean
        started = time.perf_counter()
        if how != "mean of old rows":
            solve = {"class means": per_gate(class_mean_difference), "arrow": per_gate(arrow_prototype(model)),
                     "fit": solve_gates}[how]
            new = warm.new_expert_ids(model) if how == "fit" else []  # the registration's guard
            fit_gates(model, tokenizer, fit_items(train_samples, config), config, rows=warm.fresh_rows(model), solve=solve,
                      new_experts=new)
        seconds = time.perf_counter() - started
        top2 = accuracy_per_task(model, tokenizer, eval_sets, model.prompt_format)
        rows[how] = {"seconds": round(seconds, 1), "routing_accuracy": response_routing_accuracy(model, tokenizer, evaluation,
                                                                                                 model.prompt_format),
                     "top2": top2, "new_tasks_top2": {t: top2[t] for t in names[FIRST:]}}
        print(f"  {how}: routing {rows[how]['routing_accuracy']:.3f}, new tasks {rows[how]['new_tasks_top2']}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sgd-steps", type=int, default=300,
                        help="the loop's steps (bench-real's first registration); 0: the loop is not run")
    parser.add_argument("--sgd-workers", type=int, nargs="+", default=[2, 1], help="the loop's worker counts")
    parser.add_argument("--refine-steps", type=int, default=60, help="fit+sgd: the loop's steps after the fit")
    parser.add_argument("--samples", type=int, default=30, help="eval samples per task")
    parser.add_argument("--old-samples", type=int, default=100, help="eval samples per old task for the registration")
    parser.add_argument("--composites", type=int, default=40, help="composites per n")
    parser.add_argument("--work", default="/tmp/bench-gate-fit")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gate_fit"))
    parser.add_argument("--resume", action="store_true", help="keep --work and skip the stages it finished")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    if not args.resume:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(work, args.resume)
    paths = manifests(build(), work)
    ray.init(**LOCAL_RAY)
    registry = str(work / "registry")
    stages.run("collect", lambda: collect(load_manifest(paths["more"]), registry).committed)
    names = Registry(registry).names
    first = names[:FIRST]

    two, one = {"num_workers": 2, "cpus_per_worker": 1}, {"num_workers": 1, "cpus_per_worker": 2}
    runs = {
        "fit": lambda: train_job(registry, work, "fit", first, method="fit", **two),
        "fit, 1 worker": lambda: train_job(registry, work, "fit-1", first, method="fit", **one),
        "fit+sgd": lambda: train_job(registry, work, "fit-sgd", first, method="fit+sgd", steps=args.refine_steps, **two),
        "fit+sgd, 1 worker": lambda: train_job(registry, work, "fit-sgd-1", first, method="fit+sgd", steps=args.refine_steps,
                                               **one),
    }
    for i, workers in enumerate(args.sgd_workers):  # the first is the one evaluated
        name = "sgd" if i == 0 else f"sgd, {workers} worker" + "s" * (workers > 1)
        runs[name] = functools.partial(train_job, registry, work, "sgd" if i == 0 else f"sgd-{workers}", first, method="sgd",
                                       steps=args.sgd_steps, num_workers=workers, cpus_per_worker=max(1, 2 // workers))
    methods = {name: method_row(stages.run(f"train {name}", runs[name])) for name in runs if not name.startswith("sgd")}
    fitted = methods["fit"]["checkpoint"]
    def registration(name: str, workers: dict) -> dict:  # the timed stages first, the evaluations after
        return stages.run(name, lambda: method_row(train_job(registry, work, name.replace(", ", "-").replace(" ", "-"), names,
                                                             method="fit", init_from=fitted, freeze_old=True, **workers)))

    grown, grown_two = registration("registration", one), registration("registration, 2 workers", two)

    def evaluation(name: str) -> dict:
        return stages.run(f"evaluate {name}", lambda: evaluated(
            Registry(registry), names[:FIRST], methods[name]["checkpoint"], work / "eval" / name.replace("+", "-"),
            args.samples, args.composites, baselines=name == "fit"))

    evaluations = {name: evaluation(name) for name in ("fit", "fit+sgd")}
    old, new = gates(fitted), gates(grown["checkpoint"])
    held = all(torch.equal(new[k][:FIRST], v) for k, v in old.items())
    new_tasks = stages.run("registration: new tasks", lambda: evaluated(
        Registry(registry), names[FIRST:], grown["checkpoint"], work / "eval" / "registration", args.samples, 0, True))
    old_tasks = {name: stages.run(f"registration: old tasks, {name}", lambda checkpoint=checkpoint: old_task_scores(
        Registry(registry), names[:FIRST], checkpoint, args.old_samples))
        for name, checkpoint in (("before", fitted), ("after", grown["checkpoint"]))}
    inits = stages.run("initialisations", lambda: initialisations(Registry(registry), fitted, names, args.samples))
    if args.sgd_steps:  # last: the longest; 0 leaves the loop out (the report says so)
        for name in [n for n in runs if n.startswith("sgd")]:
            methods[name] = method_row(stages.run(f"train {name}", runs[name]))
        evaluations["sgd"] = evaluation("sgd")
    ray.shutdown()

    own = evaluations["fit"]["per_task"]["own adapter"]
    registration = {**grown, "two_workers": grown_two, "old_rows_bit_identical": held,
                    "new_tasks_top2": new_tasks["per_task"]["meteora top-2"],
                    "old_tasks_top2": old_tasks, "own_adapters": new_tasks["per_task"]["own adapter"]}
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(), "settings": vars(args), "recipe": RECIPE,
              "methods": methods, "evaluations": evaluations, "own_adapter": own, "registration": registration,
              "initialisations": inits}
    write(result, out, work)


def old_task_scores(registry: Registry, tasks: list[str], checkpoint: str, samples: int) -> dict[str, float]:
    bench = load_benchmark(registry, tasks, samples=samples)
    model = MeteoraModel.from_pretrained(checkpoint, base_model=copy.deepcopy(bench.base)).eval()
    return accuracy_per_task(model, bench.tokenizer, bench.eval_sets, bench.fmt, bench.metrics)


def write(result: dict, out: Path, work: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["summary"] = summarize(result)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(report(result))
    plot_per_depth(Path(result["methods"]["fit"]["checkpoint"]), out / "fit_per_depth.png")
    shutil.copyfile(work / "eval" / "fit" / "accuracy.png", out / "accuracy.png")
    print(json.dumps(result["summary"], indent=2))


def mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 4)


def summarize(result: dict) -> dict:
    own = mean(result["own_adapter"].values())
    rows = {}
    for name, row in result["methods"].items():
        evaluation = result["evaluations"].get(name)
        rows[name] = {"train_seconds": row["train_seconds"], "job_seconds": row["job_seconds"],
                      "peak_rss_mb_per_worker": row["peak_rss_mb_per_worker"]}
        if evaluation:
            per_task = evaluation["per_task"]
            rows[name].update(routing_accuracy=round(evaluation["routing_accuracy"], 4),
                              top1=mean(per_task["meteora top-1"].values()), top2=mean(per_task["meteora top-2"].values()),
                              top2_over_own=round(mean(per_task["meteora top-2"].values()) / own, 4),
                              composite_top2={n: r["summed"] for n, r in evaluation["composite"]["meteora top-2"].items()})
    registration = result["registration"]
    before, after = registration["old_tasks_top2"]["before"], registration["old_tasks_top2"]["after"]
    return {"own_adapters": own, "methods": rows,
            "fit_time_share_of_sgd": round(rows["fit"]["train_seconds"] / rows["sgd"]["train_seconds"], 4) if "sgd" in rows else None,
            "composite_baselines": {v: {n: r["summed"] for n, r in result["evaluations"]["fit"]["composite"][v].items()}
                                    for v in ("lora-b", "perfect routing", "own adapter")},
            "registration": {"workers": registration["workers"], "fit_seconds": registration["fit_seconds"],
                             "job_seconds": registration["job_seconds"],
                             "fit_seconds_2_workers": registration["two_workers"]["fit_seconds"],
                             "old_rows_bit_identical": registration["old_rows_bit_identical"],
                             "new_over_own": {t: round(v / max(registration["own_adapters"][t], 1e-9), 3)
                                              for t, v in registration["new_tasks_top2"].items()},
                             "old_tasks_change_points": {t: round(100 * (after[t] - before[t]), 1) for t in before}},
            "initialisations": {how: {"routing_accuracy": round(r["routing_accuracy"], 4), "new_tasks_top2": r["new_tasks_top2"],
                                      "all_tasks_top2": mean(r["top2"].values())}
                                for how, r in result["initialisations"].items()}}


def report(result: dict) -> str:
    summary = result["summary"]
    lines = [f"# Fitted gates against SGD: chattasks on SmolLM2-135M-Instruct\n\n`{result['command']}`\n",
             "| method | workers | train s | job s | peak MB/worker | routing | top-1 | top-2 | top-2 / own | composite-3/5/10 (top-2) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in summary["methods"].items():
        workers = result["methods"][name]["workers"]
        cells = [row.get(k, "") for k in ("routing_accuracy", "top1", "top2", "top2_over_own")]
        composite = " / ".join(str(v) for v in row.get("composite_top2", {}).values())
        lines.append(f"| {name} | {workers} | {row['train_seconds']} | {row['job_seconds']} | {row['peak_rss_mb_per_worker']} | "
                     + " | ".join(map(str, cells)) + f" | {composite} |")
    lines += ["", f"Own adapters: {summary['own_adapters']}. Composite baselines (summed): "
              f"{json.dumps(summary['composite_baselines'])}\n",
              "## The fit's evaluation, with the baselines\n",
              markdown_table(result["evaluations"]["fit"]["per_task"], result["evaluations"]["fit"]["composite"]),
              "## Registration: +2 adapters, only their rows fitted\n", "```json",
              json.dumps(summary["registration"], indent=2), "```\n",
              "## A fresh row at 0 steps of SGD\n", "| initialisation | routing | new tasks top-2 | all tasks top-2 |",
              "|---|---|---|---|"]
    for how, row in summary["initialisations"].items():
        lines.append(f"| {how} | {row['routing_accuracy']} | {row['new_tasks_top2']} | {row['all_tasks_top2']} |")
    return "\n".join(lines) + "\n"


def plot_per_depth(checkpoint: Path, file: Path) -> None:
    """The fit's accuracy on its calibration tokens per module, against depth, one line per projection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = json.loads((checkpoint / "meteora_config.json").read_text())["training"]["fit"]["per_module"]
    by_kind: dict[str, list[tuple[int, float]]] = {}
    for name, stats in modules.items():
        by_kind.setdefault(name.rsplit(".", 1)[-1], []).append((int(name.split(".")[2]), stats["accuracy"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, points in sorted(by_kind.items()):
        ax.plot(*zip(*sorted(points)), marker=".", label=kind)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("fit accuracy on its calibration tokens")
    ax.set_title("per-module fit accuracy (every labelled token, prompts included)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
