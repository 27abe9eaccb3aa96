"""The fit's settings side by side on the real model (chattasks on SmolLM2-135M-Instruct), in one process (no Ray
Train: the settings, not the distribution, are measured). Each variant fits the gates of a fresh fused model of
the first 10 adapters, then routing accuracy on 256 eval responses; the variants that trade quality for time
also register the last 2 adapters from that fit (only their rows fitted) and measure routing on all 12 tasks.
At the defaults, MeteoRA top-2 per task at routing temperatures 0.5 / 1 / 2 (a temperature T divides every
logit: the logit scale the L2 term leaves sets top-2's mixing weights).

  variants     the defaults (fit_samples 24, fit_tokens 8192, fit_l2 0.01, fit_iters 25, a quarter composites);
               fit_iters 50; fit_tokens 4096; fit_l2 0.1 / 0.001; fit_samples 12 / 48; a second pass (fitting again,
               every module captured under the first pass's gates)
Writes benchmarks/results/gate_fit/settings.json (command, machine) and settings.md.

    python benchmarks/bench_fit_settings.py [--work DIR (default: $METEORA_CACHE/bench-fit-settings)] [--samples 30]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import ray  # noqa: E402
import torch  # noqa: E402

from bench_chattasks import FIRST, manifests  # noqa: E402
from bench_mixture import machine  # noqa: E402
from meteora_moe import MeteoraModel, load_tokenizer  # noqa: E402
from meteora_moe.evaluation import accuracy_per_task  # noqa: E402
from meteora_moe.registry import Registry, load_manifest  # noqa: E402
from meteora_moe.store import cache_dir  # noqa: E402
from meteora_moe.training import (GateTrainingConfig, fit_gates, fit_items, init_gates_from, registry_samples,  # noqa: E402
                              response_routing_accuracy, shuffled, solve_gates)
from pipelines.collect_adapters import collect  # noqa: E402
from pipelines.ray_env import LOCAL_RAY  # noqa: E402
from suites.chattasks import build  # noqa: E402

DEFAULTS = GateTrainingConfig(composite_fraction=0.25)
WORK = str(cache_dir() / "bench-fit-settings")  # the registry and the first fit, kept between runs
VARIANTS = {"defaults": {}, "fit_iters 50": {"fit_iters": 50}, "fit_tokens 4096": {"fit_tokens": 4096},
            "fit_l2 0.1": {"fit_l2": 0.1}, "fit_l2 0.001": {"fit_l2": 1e-3}, "fit_samples 12": {"fit_samples": 12},
            "fit_samples 48": {"fit_samples": 48}, "two passes": {}}
REGISTERED = ("defaults", "fit_iters 50", "fit_tokens 4096")  # also time a registration
TEMPERATURES = (0.5, 1.0, 2.0)


def fitted(registry: Registry, names: list[str], tokenizer, config: GateTrainingConfig, passes: int = 1,
           init_from: str | None = None, solve=solve_gates) -> tuple[MeteoraModel, dict]:
    """A fused model of `names` with fitted gates (from init_from: only the fresh rows; solve: fit_gates' rule for a
    module group's rows), and its numbers."""
    model = MeteoraModel.from_adapters(registry.base_model["uri"], registry.adapter_dirs(names), prompt_format="chat").eval()
    warm = init_gates_from(model, init_from) if init_from else None
    fresh = warm.fresh_rows(model) if warm else None
    new = warm.new_expert_ids(model) if warm else []
    items = fit_items(registry_samples(registry, names, "train"), config)
    started = time.perf_counter()
    for _ in range(passes):
        report = fit_gates(model, tokenizer, items, config, rows=fresh, solve=solve, new_experts=new)
    seconds = time.perf_counter() - started
    modules = report["modules"].values()
    evaluation = shuffled(registry_samples(registry, names, "eval"), 0)[:256]
    return model, {"fit_seconds": round(seconds, 1), "tokens": report["tokens"],
                   "solve_seconds": round(sum(m["seconds"] for m in modules), 1),
                   "fit_accuracy": round(sum(m["accuracy"] for m in modules) / len(modules), 4),
                   "routing_accuracy": round(response_routing_accuracy(model, tokenizer, evaluation, model.prompt_format), 4)}


def collected_registry(manifest: Path, work: Path) -> Registry:
    """The manifest's adapters collected into work/registry on a local Ray, once (a later run reuses it)."""
    if not (work / "registry" / "registry.json").exists():
        ray.init(**LOCAL_RAY)
        assert collect(load_manifest(manifest), str(work / "registry")).committed
        ray.shutdown()
    return Registry(str(work / "registry"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=WORK)
    parser.add_argument("--samples", type=int, default=30, help="eval samples per task for top-2 per task")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gate_fit"))
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    registry = collected_registry(manifests(build(), work)["more"], work)
    every, base_uri = registry.names, registry.base_model["uri"]
    names = every[:FIRST]
    tokenizer = load_tokenizer(base_uri)
    eval_sets = {name: [s for s, _ in registry_samples(registry, [name], "eval")][:args.samples] for name in names}
    torch.set_num_threads(2)
    rows = {}
    for name, overrides in VARIANTS.items():
        config = dataclasses.replace(DEFAULTS, **overrides)
        model, row = fitted(registry, names, tokenizer, config, passes=2 if name == "two passes" else 1)
        rows[name] = {"settings": overrides, **row}
        if name in REGISTERED:
            model.save_pretrained(work / "first")
            rows[name]["registration"] = fitted(registry, every, tokenizer, config, init_from=str(work / "first"))[1]
        if name == "defaults":
            rows[name]["top2_by_temperature"] = {}
            for temperature in TEMPERATURES:
                with model.configured(temperature=temperature):
                    scores = accuracy_per_task(model, tokenizer, eval_sets, model.prompt_format)
                rows[name]["top2_by_temperature"][str(temperature)] = round(sum(scores.values()) / len(scores), 4)
        print(name, json.dumps(rows[name]), flush=True)
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(), "defaults": dataclasses.asdict(DEFAULTS),
              "variants": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(result, indent=2))
    lines = [f"# The fit's settings on chattasks (10 adapters, then +2 registered)\n\n`{result['command']}`\n",
             "| variant | fit s | solve s | tokens | fit accuracy | routing on eval responses | +2: fit s | +2: routing (12 tasks) |",
             "|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        grown = r.get("registration", {})
        lines.append(f"| {n} | {r['fit_seconds']} | {r['solve_seconds']} | {r['tokens']} | {r['fit_accuracy']} | "
                     f"{r['routing_accuracy']} | {grown.get('fit_seconds', '')} | {grown.get('routing_accuracy', '')} |")
    lines += ["", f"MeteoRA top-2 (mean over tasks) at routing temperature T: {rows['defaults']['top2_by_temperature']}", ""]
    (out / "settings.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
