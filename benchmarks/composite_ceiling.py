"""How much of a composite's loss is routing, and how much the adapters: one checkpoint, two routings.

On composite-n problems of a manifest's eval data (and on single problems), every sub-answer is scored by
teacher forcing: it counts as right when the model's greedy next token is the reference at each of its
positions (its answer and the line end), given the reference before it. For a single problem this equals greedy
generation's exact match; for a composite it scores each sub-answer as if the earlier ones were right.
  gates      the checkpoint's routing (top-k as configured)
  teacher    every token sent to its own problem's expert alone (MeteoraModel.route_tokens with the tokens' task
             labels): perfect routing, the most any gate could reach with these adapters on this base
  line starts  teacher routing on the first two tokens of every problem (<s> and the instruction's first
             character for the first one), the gates elsewhere: what is lost where no causal gate can tell the task
  base       the base model alone on single and composite problems of the format tasks it was trained on (the
             tinytasks build's base_tasks, from its build_report.json; skipped for other manifests): how well the
             base itself keeps the composite format, which every adapter builds on
Writes benchmarks/results/composite_ceiling.json.

    python benchmarks/composite_ceiling.py --checkpoint CKPT [--manifest M] [--count 40]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from meteora_moe import MeteoraModel  # noqa: E402
from meteora_moe.evaluation import composite_problems, load_benchmark  # noqa: E402
from meteora_moe.registry import load_manifest  # noqa: E402
from pipelines.collect_adapters import collected  # noqa: E402
from pipelines.evaluate import manifest_registry  # noqa: E402
from meteora_moe.store import open_store, split_uri  # noqa: E402
from meteora_moe.training import gate_batch  # noqa: E402
from suites.tinytasks import ALL_TASKS, build  # noqa: E402


ROUTINGS = ("gates", "teacher", "line starts")
LINE_START_TOKENS = 2


@torch.no_grad()
def sub_answers_right(model, tokenizer, items: list[list[tuple[dict, int]]], routing: str = "gates") -> list[list[bool]]:
    """Per item, per sub-problem: is every teacher-forced prediction of its answer and line end right?"""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    batch = gate_batch(tokenizer, items)
    if routing == "teacher":
        context = model.route_tokens(batch["token_tasks"].clamp(min=0))
    elif routing == "line starts":
        context = model.route_tokens(line_start_experts(tokenizer, items, batch))
    else:
        context = contextlib.nullcontext()
    with context:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    right = logits.argmax(-1)[:, :-1] == batch["input_ids"][:, 1:]  # [B, S-1]: position i predicts token i+1
    result = []
    for row, item in enumerate(items):
        start, scores = int(batch["prompt_lengths"][row]) - 1, []
        for sample, _ in item:  # each answer plus the newline or </s> after it
            length = len(tokenizer(sample["response"], add_special_tokens=False)["input_ids"]) + 1
            scores.append(bool(right[row, start:start + length].all()))
            start += length
        result.append(scores)
    return result


def line_start_experts(tokenizer, items: list[list[tuple[dict, int]]], batch) -> torch.Tensor:
    """[B, S] expert ids for route_tokens: each problem's task on its first LINE_START_TOKENS tokens, -1 (the gates)
    elsewhere."""
    experts = torch.full_like(batch["input_ids"], -1)
    for row, item in enumerate(items):
        start = 0
        for j, (sample, task) in enumerate(item):
            experts[row, start:start + LINE_START_TOKENS] = task
            start += len(tokenizer(sample["prompt"], add_special_tokens=False)["input_ids"]) + (j == 0)  # <s> first
    return experts


def labelled(tasks: list[str], problems) -> list[list[tuple[dict, int]]]:
    """composite_problems as gate_batch items: each problem's sample labelled with its task's expert."""
    return [[(sample, tasks.index(t)) for t, sample in zip(p.tasks, p.samples)] for p in problems]


def base_tasks(manifest_uri: str) -> list[str]:
    """The format tasks the tinytasks build beside the manifest trained its base on (its build_report.json);
    none for a manifest that is not a tinytasks build."""
    parent, _ = split_uri(manifest_uri)
    store = open_store(parent)
    if not store.exists("build_report.json"):
        return []
    return json.loads(store.read_bytes("build_report.json")).get("config", {}).get("base_tasks", [])


def format_problems(names: list[str], count: int, n: int, seed: int = 0) -> list[list[tuple[dict, int]]]:
    """`count` composites of n problems of the format tasks `names` (n = 1: single problems)."""
    rng = random.Random(f"format:{n}:{seed}")
    return [[(ALL_TASKS[rng.choice(names)].sample(rng), 0) for _ in range(n)] for _ in range(count)]


def summary(scores: list[list[bool]]) -> dict:
    per_position = [sum(s[i] for s in scores) / len(scores) for i in range(len(scores[0]))]
    return {"summed": round(sum(per_position), 3), "per_position": [round(p, 3) for p in per_position]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--manifest", default=None, help="default: the embedded tinytasks build")
    parser.add_argument("--count", type=int, default=40, help="composites per size")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "composite_ceiling.json"))
    args = parser.parse_args()
    manifest = args.manifest or build()
    loaded = load_manifest(manifest)
    bench = load_benchmark(collected(loaded, manifest_registry(loaded)))
    if bench.fmt.name != "plain":  # its line starts and answer lengths read the plain format's layout
        parser.error(f"{manifest}: prompt format {bench.fmt.name!r}; this benchmark reads the plain format only")
    model = MeteoraModel.from_pretrained(args.checkpoint, base_model=copy.deepcopy(bench.base)).eval()
    tasks = model.expert_names
    sets = {"single": [[(s, tasks.index(t))] for t in tasks for s in bench.eval_sets[t]]}
    sets.update({f"composite-{n}": labelled(tasks, composite_problems(bench.eval_sets, n, args.count, bench.fmt)) for n in (3, 5)})
    report = {"command": "python " + " ".join(sys.argv), "checkpoint": args.checkpoint,
              "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}}
    for name, items in sets.items():
        for routing in ROUTINGS:
            scores = sub_answers_right(model, bench.tokenizer, items, routing)
            report.setdefault(name, {})[routing] = summary(scores)
            if name == "single":
                report[name][routing]["per_task"] = {
                    task: summary([s for s, item in zip(scores, items) if item[0][1] == e])["summed"] for e, task in enumerate(tasks)}
            print(f"{name:12s} {routing:11s} {report[name][routing]}", flush=True)
    names = base_tasks(manifest)
    for name, n in (("single", 1), ("composite-3", 3), ("composite-5", 5)) if names else ():
        items = format_problems(names, args.count * 3, n)
        report[name]["base on its format tasks"] = summary(sub_answers_right(bench.base, bench.tokenizer, items))
        print(f"{name:12s} base on its format tasks {report[name]['base on its format tasks']}", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
