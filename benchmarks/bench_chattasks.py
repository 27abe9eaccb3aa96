"""The real-model benchmark: chattasks on SmolLM2-135M-Instruct (offline, from PyPI), through the whole pipeline.

One run, on a local Ray started here; every stage through pipelines/workflow.run (collect -> the gates with Ray
Train, 2 CPU workers, by --method -> deploy on Ray Serve -> evaluate):
  build      the suite (cached by content; --fresh-cache builds it from nothing): seconds per phase
  first      the first 10 adapters (attention projections): per task and on composite-3/5/10 (the paper's
             protocol: numbered, --shots worked examples): base, own adapter, LoRA-B, merged, MeteoRA top-1 and
             top-2 (composites also at --temperature), perfect routing, the oracle; routing accuracy on eval
             responses; a chat request through the deployed endpoint with the openai client
  increment  +2 adapters on MLP projections (modules no earlier adapter targets), --init-from the first
             checkpoint (the fit: only their rows; SGD: 25% of the steps), redeployed in place while a client keeps
             asking a new task's question: seconds from the workflow's start to the first answer routed to the new
             expert, failed requests; old tasks against the first round, new tasks against their oracle,
             training time against the first round's
  byo        an adapter trained outside the project with plain peft (examples/byo_adapter.py), its JSONL and a
             manifest entry: registered, trained incrementally, evaluated, served and asked through the openai client
  speed      prefill and decode tokens/s, side by side: the base, PEFT with one adapter, MeteoRA (torch backend,
             all 12 experts at their mixed ranks, top-2); decode batch 8 and 1
  scaling    gate training (--method) with 1 and with 2 workers: seconds (and samples/s for SGD)
Writes benchmarks/results/chattasks/: results.json (with the command and the machine), results.md, plots.

    python benchmarks/bench_chattasks.py [--method fit] [--steps 300] [--lr 0.01] [--samples 30] [--composites 10]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "examples")]
import ray  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from bench_mixture import (decode_tokens_per_s, machine, prefill_tokens_per_s, ratios_to_peft,  # noqa: E402
                           side_by_side)
from client import keep_asking, new_question  # noqa: E402
from meteora_moe import MeteoraModel, load_base_model  # noqa: E402
from meteora_moe.evaluation import markdown_table  # noqa: E402
from meteora_moe.registry import load_manifest  # noqa: E402
from pipelines.ray_env import LOCAL_RAY  # noqa: E402
from pipelines.local_cluster import free_ports  # noqa: E402
from pipelines.train_config import load_train_config  # noqa: E402
from pipelines.train_gates import train  # noqa: E402
from pipelines.workflow import load_workflow_config, run  # noqa: E402
from suites.chattasks import build  # noqa: E402

FIRST = 10  # the first registration; the rest of RECIPES is the increment


def manifests(built: str, out: Path, byo_entry: dict | None = None) -> dict[str, Path]:
    """first.yaml (the first 10 adapters), more.yaml (all 12) and byo.yaml (+ the bring-your-own adapter), each
    naming the build's baselines (LoRA-B and merged)."""
    document = yaml.safe_load(Path(built).read_text())
    subsets = {"first": document["adapters"][:FIRST], "more": document["adapters"]}
    if byo_entry:
        subsets["byo"] = document["adapters"] + [byo_entry]
    paths = {}
    for name, adapters in subsets.items():
        paths[name] = out / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({**document, "adapters": adapters}, sort_keys=False))
    return paths


def evaluation(outputs: dict) -> dict:
    return json.loads((Path(outputs["evaluate"].out_dir) / "results.json").read_text())


def ask(port: int, content: str) -> dict:
    """One chat request through the deployed endpoint with the official openai client."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=2, timeout=120)
    reply = client.chat.completions.create(model="meteora", messages=[{"role": "user", "content": content}], max_tokens=32,
                                           temperature=0, extra_body={"return_routing": True})
    choice = reply.choices[0]
    heaviest = [next(iter(step["experts"]), "-") for step in choice.routing]
    return {"prompt": content, "answer": choice.message.content, "heaviest_expert_per_token": heaviest}


def speed(checkpoint: str, adapter: Path, repeats: int, new_tokens: int) -> dict:
    """Side-by-side tokens/s (medians of `repeats`, variants interleaved) and ratios to PEFT with one adapter."""
    from peft import PeftModel

    fused = MeteoraModel.from_pretrained(checkpoint, backend="torch").eval()
    base = load_base_model(fused.base_info.uri).eval()
    peft = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    variants = {name: (lambda fn, *a, model=model: fn(model, *a))
                for name, model in {"base": base, "peft_one_adapter": peft, "meteora_torch_top2": fused}.items()}
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, base.config.vocab_size, (b, 128), generator=g) for b in (8, 1)}
    scenarios = {"decode_batch8": (decode_tokens_per_s, prompts[8], new_tokens),
                 "decode_batch1": (decode_tokens_per_s, prompts[1], new_tokens),
                 "prefill_batch8x128": (prefill_tokens_per_s, prompts[8])}
    samples = side_by_side(variants, scenarios, prompts[1], repeats)
    return {**ratios_to_peft(samples), "experts": len(fused.expert_names), "ranks": sorted({e.rank for e in fused.experts}),
            "adapted_layers": len(fused.layer_names), "peft_adapter": adapter.name, "samples": samples}


def scaling(registry: str, storage: Path, method: str, steps: int) -> dict:
    """Gate training by `method` with 1 and with 2 workers: its seconds (the job's startup excluded), and samples/s
    of the SGD loop."""
    result = {}
    for workers in (1, 2):
        values = {"registry": registry, "storage_path": str(storage), "name": f"scaling-{workers}-{uuid.uuid4().hex[:6]}",
                  "method": method, "num_workers": workers, "cpus_per_worker": 2 / workers, "steps": steps, "batch": 16,
                  "checkpoint_every": steps, "eval_samples": 0, "composite_fraction": 0.25}
        summary = train(load_train_config(None, [f"{k}={v}" for k, v in values.items()]))
        result[f"workers_{workers}"] = {"samples_per_s": summary["samples_per_s"], "train_seconds": summary["train_seconds"]}
    result["speedup"] = round(result["workers_1"]["train_seconds"] / result["workers_2"]["train_seconds"], 3)
    return result


def mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="fit", choices=("fit", "sgd", "fit+sgd"), help="how the gates learn")
    parser.add_argument("--steps", type=int, default=300, help="SGD steps of the first registration (sgd, fit+sgd)")
    parser.add_argument("--lr", type=float, default=0.01, help="the gates' learning rate (0.005 before 2026-12-04)")
    parser.add_argument("--composite-fraction", type=float, default=0.25, help="share of gate-training items that are composites")
    parser.add_argument("--samples", type=int, default=30, help="eval samples per task")
    parser.add_argument("--composites", type=int, default=10, help="composites per n")
    parser.add_argument("--shots", type=int, default=0,  # the adapters copy worked examples' answers (benchmarks/NOTES.md)
                        help="worked composites before each composite question (the paper: 2; 2 before 2026-12-05)")
    parser.add_argument("--temperature", type=float, default=2.0, help="MeteoRA top-2 routing temperature on composites")
    parser.add_argument("--fresh-cache", action="store_true", help="build the suite from an empty cache")
    parser.add_argument("--work", default="/tmp/bench-chattasks")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chattasks"))
    parser.add_argument("--speed-only", action="store_true", help="measure speed again on the last run's checkpoint")
    parser.add_argument("--resume", action="store_true", help="keep --work: the workflow skips the stages it finished")
    parser.add_argument("--no-byo", action="store_true", help="skip the bring-your-own stage")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    if args.speed_only:
        return speed_again(work, out)
    if not args.resume:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.fresh_cache:
        os.environ["METEORA_CACHE"] = str(work / "cache")
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(), "settings": vars(args)}

    started = time.perf_counter()
    built = build()
    result["build"] = {"seconds": round(time.perf_counter() - started, 1),
                       "report": json.loads((Path(built).parent / "build_report.json").read_text())}
    print(f"[build] {result['build']['seconds']} s: {built}", flush=True)

    ray.init(**LOCAL_RAY)
    port = free_ports(1)[0]
    common = [f"registry={work / 'registry'}", f"work_dir={work}", f"train.method={args.method}",
              f"train.steps={args.steps}", "train.batch=16",
              f"train.lr={args.lr}", "train.cpus_per_worker=1", "train.precision=fast",
              f"train.composite_fraction={args.composite_fraction}",
              "incremental_steps=0.25",  # the increment's target is <= 30% of the first training's time, startup included
              f"evaluate.samples={args.samples}", f"evaluate.composite_count={args.composites}",
              f"evaluate.composite_shots={args.shots}", f"evaluate.composite_temperature={args.temperature}",
              # the replica reserves no CPU: training takes both (2 workers x 1), and would wait for one forever
              f"deploy.http_port={port}", "deploy.deployment={ray_actor_options: {num_cpus: 0}, num_replicas: 1, "
              "max_surge_percent: 100}"]
    paths = manifests(built, work)
    config = load_workflow_config(None, [*common, "evaluate.composite=[3, 5, 10]"])
    first = run(load_manifest(paths["first"]), config, can_deploy=True)
    result["first"] = {"outputs": {k: dataclasses.asdict(v) for k, v in first.items()}, "evaluation": evaluation(first),
                       "asked": ask(port, "1. 2023-07-14\n2. Which number is larger, 135 or 229?\n3. anna.smith@mail.com")}
    print(markdown_table(result["first"]["evaluation"]["per_task"], result["first"]["evaluation"]["composite"]), flush=True)

    config = load_workflow_config(None, [*common, "evaluate.composite=[]"])
    grown = load_manifest(paths["more"])
    expert, question = new_question(grown, grown.names[FIRST])
    stop, outcomes = threading.Event(), []
    client = threading.Thread(target=keep_asking, args=(f"http://127.0.0.1:{port}", question, expert, stop, outcomes))
    client.start()
    try:  # the client asks while the new adapters are registered and deployed; then the evaluation runs alone
        run(grown, config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"enabled": False})}),
            can_deploy=True)
    finally:
        stop.set()
        client.join()
    more = run(grown, config, can_deploy=True)
    result["increment"] = {"outputs": {k: dataclasses.asdict(v) for k, v in more.items()}, "evaluation": evaluation(more),
                           "client": {"asked": question, "expert": expert, "requests": len(outcomes),
                                      "failed": sum(not ok for _, ok, _ in outcomes),
                                      "first_routed_to_new_expert_s": next((round(at, 1) for at, _, new in outcomes if new), None)}}

    if not args.no_byo:
        result["byo"] = bring_your_own(built, work, config, port)

    from ray import serve

    serve.shutdown()
    adapter = Path(load_manifest(paths["first"]).adapters[0].uri)
    result["speed"] = speed(more["train"].checkpoint, adapter, repeats=3, new_tokens=32)
    result["scaling"] = scaling(str(work / "registry"), work / "scaling-runs", args.method, steps=20)
    ray.shutdown()

    out.mkdir(parents=True, exist_ok=True)
    for name in ("accuracy.png", "routing.png"):
        shutil.copyfile(Path(first["evaluate"].out_dir) / name, out / name)
    write(result, out)


def bring_your_own(built: str, work: Path, config, port: int) -> dict:
    """An adapter trained with plain peft (examples/byo_adapter.py) registered beside the suite's, through the workflow."""
    byo_dir = work / "byo"
    subprocess.run([sys.executable, str(ROOT / "examples" / "byo_adapter.py"), "--base",
                    load_manifest(work / "first.yaml").base_uri, "--out", str(byo_dir)], check=True)
    paths = manifests(built, work, yaml.safe_load((byo_dir / "entry.yaml").read_text()))
    byo = run(load_manifest(paths["byo"]), config, can_deploy=True)
    return {"outputs": {k: dataclasses.asdict(v) for k, v in byo.items()}, "evaluation": evaluation(byo),
            "asked": ask(port, "Acronym: light emitting diode")}


def speed_again(work: Path, out: Path) -> None:
    """The speed stage alone, on the checkpoint and adapter of the run whose results are in `out`."""
    result = json.loads((out / "results.json").read_text())
    adapter = Path(load_manifest(work / "first.yaml").adapters[0].uri)
    result["speed"] = speed(result["increment"]["outputs"]["train"]["checkpoint"], adapter, repeats=5, new_tokens=32)
    result["speed"].update(command="python " + " ".join(sys.argv), machine=machine())  # not the run's machine
    write(result, out)


def write(result: dict, out: Path) -> None:
    result["summary"] = summarize(result)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(report(result))
    print(json.dumps(result["summary"], indent=2))


def summarize(result: dict) -> dict:
    """The numbers the targets are about."""
    first, more = result["first"]["evaluation"], result["increment"]["evaluation"]
    own = first["per_task"]["own adapter"]
    old = list(own)
    new = [t for t in more["per_task"]["own adapter"] if t not in old]
    first_seconds = result["first"]["outputs"]["train"]["train_seconds"]
    return {
        "single": {variant: mean(scores.values()) for variant, scores in first["per_task"].items()},
        "top2_over_own": round(mean(first["per_task"]["meteora top-2"].values()) / mean(own.values()), 4),
        "routing_accuracy": first.get("routing_accuracy"),
        "composite_summed": {v: {n: round(r["summed"], 3) for n, r in sizes.items()} for v, sizes in first["composite"].items()},
        "increment": {
            "old_tasks_change": {t: round(more["per_task"]["meteora top-2"][t] - first["per_task"]["meteora top-2"][t], 3)
                                 for t in old},
            "new_over_oracle": {t: round(more["per_task"]["meteora top-2"][t] / max(more["per_task"]["own adapter"][t], 1e-9), 3)
                                for t in new},
            "time_ratio": round(result["increment"]["outputs"]["train"]["train_seconds"] / first_seconds, 3),
            "client": result["increment"]["client"],
        },
        "byo": {"top2": result["byo"]["evaluation"]["per_task"]["meteora top-2"].get("acronym"),
                "own_adapter": result["byo"]["evaluation"]["per_task"]["own adapter"].get("acronym"),
                "asked": result["byo"]["asked"]} if "byo" in result else None,
        "speed_ratio_to_peft": result["speed"]["ratio_to_peft_one_adapter"]["meteora_torch_top2"],
        "gate_training_scaling": result["scaling"],
        "build_seconds": result["build"]["report"]["seconds"],
    }


def report(result: dict) -> str:
    first, more = result["first"]["evaluation"], result["increment"]["evaluation"]
    return "\n".join([
        f"# chattasks on SmolLM2-135M-Instruct\n\n`{result['command']}`\n",
        f"## First registration: {FIRST} adapters\n", markdown_table(first["per_task"], first["composite"]),
        f"routing accuracy on eval responses: {first.get('routing_accuracy')}\n",
        "## +2 adapters on MLP projections (incremental)\n", markdown_table(more["per_task"], {}),
        "## Summary\n", "```json", json.dumps(result["summary"], indent=2), "```", ""])


if __name__ == "__main__":
    main()
