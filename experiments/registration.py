"""What a registration costs the old tasks, and a remedy tried: chattasks' last 2 adapters registered into a fit of
its first 10, only their rows fitted, then MeteoRA top-2 on 100 eval samples of the two old tasks a registration
cost (kv_json, list_max) and of the two new ones. The registry and the first fit are bench_fit_settings' (made in
the work directory if missing); each registering rule starts from the same first fit, in one process.

    python experiments/registration.py register                     # the library's registration (guarded)
    python experiments/registration.py register --fit-guard 0       # without the guard (Guard in training/fitting.py)
    python experiments/registration.py register --fit-guard 0 --fit-samples 72 --fit-tokens 0  # more tokens, all kept
    python experiments/registration.py register --fit-guard 0 --sgd-steps 60  # the fit, then the loop on the fresh rows
    python experiments/registration.py scratch                      # no registration: all 12 experts' rows fitted
    python experiments/registration.py first --seed 1               # the first 10 fitted again, another draw
    python experiments/registration.py register --fit-guard-l2 0.01 --fit-guard-iters 25  # the first fit's L2, iterations

Without the guard the new rows are fitted with --fit-l2 and --fit-iters, with it with --fit-guard-l2 (every row)
and --fit-guard-iters (where old rows are held).

Two rules register nothing, as references: scratch, what the method gives
the old tasks with the 2 new experts in the mixture when no row is held; first, the first fit again with another
seed (another draw of calibration items), all 10 tasks scored: how far two equally good fits differ.
Findings: benchmarks/NOTES.md, "kv_json after a registration" and "The cause, and the guard".
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import torch  # noqa: E402

import bench_fit_settings  # noqa: E402
from bench_chattasks import FIRST, manifests  # noqa: E402
from meteora_moe import load_tokenizer  # noqa: E402
from meteora_moe.evaluation import accuracy_per_task  # noqa: E402
from meteora_moe.training import GateTrainer, init_gates_from, registry_samples, shuffled  # noqa: E402
from suites.chattasks import build  # noqa: E402

OLD, NEW = ("kv_json", "list_max"), ("last_first", "snake_label")


def refine(model, registry, tokenizer, config, first: str, steps: int) -> dict:
    """`steps` of the loop on the fitted model's fresh rows, its other rows frozen (one process, as one worker)."""
    recipe = dataclasses.replace(config, method="sgd", steps=steps, batch=16, lr=0.01, freeze_old=True)
    warm_start = init_gates_from(copy.deepcopy(model), first)  # which rows are fresh; the fitted rows stay as they are
    trainer = GateTrainer(model, tokenizer, recipe, warm_start)
    started = time.perf_counter()
    record = trainer.run(shuffled(registry_samples(registry, registry.names, "train"), recipe.seed), [])
    return {"seconds": round(time.perf_counter() - started, 1), "loss": record["loss"], "gate_loss": record["gate_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rule", choices=["register", "scratch", "first"])
    parser.add_argument("--work", default=bench_fit_settings.WORK, help="bench_fit_settings' work directory")
    parser.add_argument("--samples", type=int, default=100, help="eval samples per task")
    parser.add_argument("--fit-samples", type=int, help="the registration's fit_samples (default: the first fit's)")
    parser.add_argument("--fit-tokens", type=int, help="the registration's fit_tokens (0: every labelled token)")
    parser.add_argument("--fit-l2", type=float, help="the registration's fit_l2 (default: the first fit's)")
    parser.add_argument("--fit-iters", type=int, help="the registration's fit_iters (default: the first fit's)")
    parser.add_argument("--fit-guard", type=float, help="the registration's fit_guard (default: the library's)")
    parser.add_argument("--fit-guard-l2", type=float, help="the registration's fit_guard_l2 (default: the library's)")
    parser.add_argument("--fit-guard-iters", type=int, help="the registration's fit_guard_iters (default: the library's)")
    parser.add_argument("--seed", type=int, help="the fit's seed, which draws its calibration items (default: 0)")
    parser.add_argument("--sgd-steps", type=int, default=0, help="then this many steps of the loop (bench-real's "
                        "recipe: batch 16, lr 0.01) on the fresh rows, old rows frozen, as method fit+sgd runs it")
    args = parser.parse_args()
    if args.sgd_steps and args.rule in ("scratch", "first"):
        parser.error(f"--sgd-steps refines a registration's fresh rows: {args.rule} registers nothing")
    torch.set_num_threads(2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    registry = bench_fit_settings.collected_registry(manifests(build(), work)["more"], work)
    tokenizer = load_tokenizer(registry.base_model["uri"])
    config = bench_fit_settings.DEFAULTS
    if not (work / "first" / "meteora_config.json").is_file():
        bench_fit_settings.fitted(registry, registry.names[:FIRST], tokenizer, config)[0].save_pretrained(work / "first")
    overrides = {k: v for k, v in {"fit_samples": args.fit_samples, "fit_tokens": args.fit_tokens, "fit_l2": args.fit_l2,
                                   "fit_iters": args.fit_iters, "fit_guard": args.fit_guard, "fit_guard_l2": args.fit_guard_l2,
                                   "fit_guard_iters": args.fit_guard_iters, "seed": args.seed}.items()
                 if v is not None}
    names = registry.names[:FIRST] if args.rule == "first" else registry.names
    init_from = None if args.rule in ("scratch", "first") else str(work / "first")
    model, row = bench_fit_settings.fitted(registry, names, tokenizer, dataclasses.replace(config, **overrides),
                                           init_from=init_from)
    if args.sgd_steps:
        row["sgd"] = refine(model, registry, tokenizer, dataclasses.replace(config, **overrides), str(work / "first"),
                            args.sgd_steps)
    scored = names if args.rule == "first" else OLD + NEW
    evals = {name: [s for s, _ in registry_samples(registry, [name], "eval")][:args.samples] for name in scored}
    started = time.perf_counter()
    top2 = accuracy_per_task(model, tokenizer, evals, model.prompt_format)
    print(json.dumps({"rule": args.rule, **overrides,
                      "sgd_steps": args.sgd_steps,
                      **row, "top2": top2, "eval_seconds": round(time.perf_counter() - started)}))


if __name__ == "__main__":
    main()
