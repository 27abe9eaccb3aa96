"""How much the fit's calibration items must hold composites for MeteoRA to answer composite prompts, on the
default demo's suite (the first 4 adapters of chattasks' DEMO config on SmolLM2-135M-Instruct), in one process.

Each variant fits the gates of a fresh fused model (the fit's defaults but for the variant's keys) as
bench_fit_settings.py does (the fit's seconds, routing accuracy on 256 eval responses), then: MeteoRA top-2 on
--composites composite-3 prompts (summed sub-answer accuracy, and per position), and the demo's showcase composite (examples/demo.py: composite_problems(..., seed=3)). Perfect
routing (every problem's tokens sent to its own expert) once, on the same prompts.

  variants     composite_fraction 0 / 0.25 / 0.5 / 0.75; composite_fraction 0.5 with fit_samples 48
Writes benchmarks/results/gate_fit/composites.json (command, machine) and composites.md.

    python benchmarks/bench_fit_composites.py [--work /tmp/bench-fit-composites] [--composites 40]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import torch  # noqa: E402
import yaml  # noqa: E402

from bench_fit_settings import collected_registry, fitted  # noqa: E402
from bench_mixture import machine  # noqa: E402
from meteora_moe.evaluation import composite_problems, composite_scores, load_benchmark, teacher_routed_scores  # noqa: E402
from meteora_moe.training import GateTrainingConfig  # noqa: E402
from suites.chattasks import DEMO, build  # noqa: E402

DEMO_ADAPTERS = 4  # the demo's first registration (examples/demo.py)
VARIANTS = {"composite_fraction 0": {"composite_fraction": 0.0}, "composite_fraction 0.25": {"composite_fraction": 0.25},
            "composite_fraction 0.5": {"composite_fraction": 0.5}, "composite_fraction 0.75": {"composite_fraction": 0.75},
            "composite_fraction 0.5, fit_samples 48": {"composite_fraction": 0.5, "fit_samples": 48}}


def demo_manifest(work: Path) -> Path:
    """The demo's first manifest (its first 4 adapters), beside the build's baselines."""
    built = Path(build(config=DEMO))
    document = yaml.safe_load(built.read_text())
    if not (work / "baselines").exists():
        (work / "baselines").symlink_to(built.parent / "baselines")
    path = work / "demo.yaml"
    path.write_text(yaml.safe_dump({**document, "adapters": document["adapters"][:DEMO_ADAPTERS]}, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/bench-fit-composites")
    parser.add_argument("--composites", type=int, default=40, help="composite-3 prompts")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gate_fit"))
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    manifest_path = demo_manifest(work)
    registry = collected_registry(manifest_path, work)
    names = registry.names
    bench = load_benchmark(registry, samples=30)
    problems = composite_problems(bench.eval_sets, 3, args.composites, bench.fmt, seed=0)
    showcase = composite_problems(load_benchmark(registry, samples=8).eval_sets, 3, 1, bench.fmt, seed=3)  # the demo's
    torch.set_num_threads(2)
    rows, perfect = {}, None
    for name, overrides in VARIANTS.items():
        model, row = fitted(registry, names, bench.tokenizer, dataclasses.replace(GateTrainingConfig(), **overrides))
        composite = composite_scores(model, bench.tokenizer, problems, bench.metrics, bench.fmt)
        rows[name] = {"settings": overrides, **row, "composite3": round(composite["summed"], 3),
                      "per_position": composite["per_position"],
                      "showcase": composite_scores(model, bench.tokenizer, showcase, bench.metrics, bench.fmt)["summed"]}
        if perfect is None:
            perfect = {"composite3": teacher_routed_scores(model, bench.tokenizer, problems, bench.metrics, bench.fmt),
                       "showcase": teacher_routed_scores(model, bench.tokenizer, showcase, bench.metrics, bench.fmt)["summed"]}
        print(name, json.dumps(rows[name]), flush=True)
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(), "tasks": names,
              "showcase_tasks": showcase[0].tasks, "variants": rows, "perfect_routing": perfect}
    out.mkdir(parents=True, exist_ok=True)
    (out / "composites.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Composites in the fit's calibration items: the demo suite ({', '.join(names)})\n\n`{result['command']}`\n",
             f"| variant | fit s | routing on eval responses | composite-3 top-2 (of 3; {args.composites} prompts) "
             "| per position | showcase (of 3) |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        positions = " / ".join(f"{p:.2f}" for p in r["per_position"])
        lines.append(f"| {name} | {r['fit_seconds']} | {r['routing_accuracy']} | {r['composite3']} | {positions} | {r['showcase']} |")
    positions = " / ".join(f"{p:.2f}" for p in perfect["composite3"]["per_position"])
    lines.append(f"| perfect routing | | | {perfect['composite3']['summed']:.3f} | {positions} | {perfect['showcase']} |")
    (out / "composites.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
