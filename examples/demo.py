"""`make demo`: the MeteoRA workflow end to end on the embedded tinytasks benchmark, on a CPU.

  1. build tinytasks (a tiny base model, one PEFT adapter per task, baselines, data, manifest; cached)
  2. collect the manifest's adapters into a local registry (Ray tasks; pipelines/collect_adapters.py)
  3. fuse the registry's adapters into one MeteoraModel and train its gates (base and adapters frozen)
  4. save the checkpoint, and evaluate every variant per task and on composite problems, with plots

    python examples/demo.py [--out demo-output] [--gate-steps 300]
About 10 minutes for the first build on 2 cores, then about 3 minutes per run.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parents[1]))  # the pipelines
from meteora import MeteoraModel, Registry  # noqa: E402
from meteora.gate_training import GateTrainingConfig, registry_samples, response_routing_accuracy, train_gates  # noqa: E402
from meteora.harness import evaluate, load_benchmark  # noqa: E402
from meteora.report import markdown_table  # noqa: E402
from meteora.tinytasks import build  # noqa: E402
from pipelines.collect_adapters import collect, print_summary  # noqa: E402

log = logging.getLogger("demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-output")
    parser.add_argument("--gate-steps", type=int, default=300)
    parser.add_argument("--composite-temperature", type=float, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)

    manifest = Path(build())
    log.info("1. tinytasks: %s", manifest)
    outcome = collect(manifest, str(out / "registry"))
    print_summary(outcome.rows)
    registry = Registry(out / "registry")
    log.info("2. registry %s holds %s", registry.uri, registry.names)

    base_uri = registry.base_model["uri"]
    model = MeteoraModel.from_adapters(base_uri, registry, top_k=2)
    tokenizer = AutoTokenizer.from_pretrained(base_uri)
    config = GateTrainingConfig(steps=args.gate_steps)
    with tqdm(total=config.steps, desc="3. training the gates", disable=None) as bar:
        def progress(step, metrics):
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", routing=f"{metrics['routing_accuracy']:.2f}")

        history = train_gates(model, tokenizer, registry_samples(registry, model.expert_names, "train"), config, progress)
    routing = response_routing_accuracy(model, tokenizer, registry_samples(registry, model.expert_names, "eval"))
    model.training_summary = {"steps": config.steps, "batch": config.batch, "lr": config.lr,
                              "final_loss": history[-1]["loss"], "eval_response_routing_accuracy": routing}
    model.save_pretrained(out / "checkpoint")
    log.info("   routing accuracy on eval response tokens: %.3f; checkpoint: %s", routing, out / "checkpoint")

    bench = load_benchmark(manifest)
    results = evaluate(bench, out / "checkpoint", composite_sizes=(3, 5), composite_count=40,
                       composite_temperature=args.composite_temperature, out_dir=out / "eval")
    log.info("4. evaluation (exact match on the eval split):\n%s", markdown_table(results["per_task"], results["composite"]))
    (out / "demo_results.json").write_text(json.dumps({"routing_accuracy_eval_response": routing,
                                                       "gate_training": history[-1], **results}, indent=2))
    log.info("results: %s, plots: %s", out / "demo_results.json", out / "eval")


if __name__ == "__main__":
    main()
