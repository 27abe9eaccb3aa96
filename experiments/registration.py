"""What a registration costs the old tasks, and a remedy tried: chattasks' last 2 adapters registered into a fit of
its first 10, only their rows fitted, then MeteoRA top-2 on 100 eval samples of the two old tasks a registration
cost (kv_json, list_max) and of the two new ones. The registry and the first fit are bench_fit_settings' (made in
the work directory if missing); each rule registers from the same first fit, in one process.

    python experiments/registration.py plain                        # the library's fit
    python experiments/registration.py guard --rho 10 --margin 0.5  # + the top-2 guard below

guard: on every calibration token of an old task, at every module, each new expert's logit is pushed under the
token's second-highest old logit minus `margin` by a squared hinge of weight `rho` (a penalty method for "the old
tasks' calibration top-2 unchanged"). Findings: benchmarks/NOTES.md, "kv_json after a registration".
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import torch  # noqa: E402

import bench_fit_settings  # noqa: E402
from bench_chattasks import FIRST, manifests  # noqa: E402
from meteora import load_tokenizer  # noqa: E402
from meteora.evaluation import accuracy_per_task  # noqa: E402
from meteora.training import registry_samples, solve_gates  # noqa: E402
from suites.chattasks import build  # noqa: E402

OLD, NEW = ("kv_json", "list_max"), ("last_first", "snake_label")


def top2_guard(new: list[int], rho: float, margin: float):
    """A solve_gates penalty: (value, gradient [E, N]) of the squared hinge above, over old tasks' tokens."""
    def penalty(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # logits [E, N]
        is_new = torch.zeros(logits.shape[0], dtype=torch.bool)
        is_new[new] = True
        old = logits.masked_fill(is_new[:, None], float("-inf")).topk(2, dim=0)
        second, where = old.values[1], old.indices[1]  # [N]
        over = (logits[new] - second + margin).clamp_min(0) * (~is_new[labels])  # [new, N]
        gradient = torch.zeros_like(logits)
        gradient[new] = rho * over
        gradient.scatter_add_(0, where[None], -rho * over.sum(0, keepdim=True))
        return 0.5 * rho * over.square().sum(), gradient
    return penalty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rule", choices=["plain", "guard"])
    parser.add_argument("--rho", type=float, default=10.0)
    parser.add_argument("--margin", type=float, default=0.5)
    parser.add_argument("--work", default=bench_fit_settings.WORK, help="bench_fit_settings' work directory")
    parser.add_argument("--samples", type=int, default=100, help="eval samples per task")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    registry = bench_fit_settings.collected_registry(manifests(build(), work)["more"], work)
    tokenizer = load_tokenizer(registry.base_model["uri"])
    config = bench_fit_settings.DEFAULTS
    if not (work / "first" / "meteora_config.json").is_file():
        bench_fit_settings.fitted(registry, registry.names[:FIRST], tokenizer, config)[0].save_pretrained(work / "first")
    new = [registry.names.index(name) for name in NEW]
    solve = functools.partial(solve_gates, penalty=top2_guard(new, args.rho, args.margin)) if args.rule == "guard" else solve_gates
    model, row = bench_fit_settings.fitted(registry, registry.names, tokenizer, config, init_from=str(work / "first"),
                                           solve=solve)
    evals = {name: [s for s, _ in registry_samples(registry, [name], "eval")][:args.samples] for name in OLD + NEW}
    started = time.perf_counter()
    top2 = accuracy_per_task(model, tokenizer, evals, model.prompt_format)
    print(json.dumps({"rule": args.rule, **({"rho": args.rho, "margin": args.margin} if args.rule == "guard" else {}),
                      **row, "top2": top2, "eval_seconds": round(time.perf_counter() - started)}))


if __name__ == "__main__":
    main()
