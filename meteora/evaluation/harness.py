"""The evaluation harness: every variant of a manifest's tasks, per task and on composite-n problems.

    variants  base | own adapter (each task's expert forced: the oracle; on composites, every sub-problem asked
              alone with its own expert) | lora-b | merged (baselines beside the manifest, when present) |
              meteora top-1 / top-2 (from a checkpoint, when given)
    outputs   results.json, results.md, accuracy.png, routing.png (one composite generation: tokens x experts)
"""
from __future__ import annotations

import copy
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import MeteoraModel, load_base_model, load_tokenizer
from ..prompts import prompt_batch
from ..registry import Manifest
from ..store import local_dir, open_store, split_uri
from .answers import accuracy_per_task, composite_oracle_scores, composite_problems, composite_scores, task_accuracy
from .report import markdown_table, plot_accuracy, plot_routing

log = logging.getLogger(__name__)


@dataclass
class Benchmark:
    tokenizer: object
    base: object
    adapters: dict[str, Path]  # task -> PEFT dir, in expert order
    eval_sets: dict[str, list[dict]]
    metrics: dict[str, str]
    baselines: dict[str, Path]  # "lora-b" / "merged" -> PEFT dir


def load_benchmark(manifest: Manifest, tasks: list[str] | None = None, samples: int | None = None) -> Benchmark:
    """A manifest's base model, adapters and eval data (from any store); the baselines/ beside it if present."""
    specs = [s for s in manifest.adapters if tasks is None or s.name in tasks]
    missing = sorted(set(tasks or []) - {s.name for s in specs})
    if missing or any(not (s.data or {}).get("eval") for s in specs):
        raise ValueError(f"{manifest.path}: unknown tasks {missing}, or an adapter without eval data")
    eval_sets = {}
    for spec in specs:
        parent, key = split_uri(spec.data["eval"])
        lines = open_store(parent).read_bytes(key).decode().splitlines()
        eval_sets[spec.name] = [json.loads(line) for line in lines if line.strip()][:samples]
    root = local_dir(split_uri(manifest.path)[0]) / "baselines"  # beside a remote manifest: mirrored with it
    return Benchmark(
        tokenizer=load_tokenizer(manifest.base_uri),
        base=load_base_model(manifest.base_uri).eval(),
        adapters={s.name: local_dir(s.uri) for s in specs},
        eval_sets=eval_sets,
        metrics={s.name: s.metric for s in specs},
        baselines={p.name: p for p in sorted(root.iterdir())} if root.is_dir() else {},
    )


def evaluate(bench: Benchmark, checkpoint: str | Path | None = None, composite_sizes=(3, 5), composite_count: int = 40,
             composite_temperature: float | None = None, out_dir: str | Path | None = None) -> dict:
    fused = MeteoraModel.from_adapters(copy.deepcopy(bench.base), bench.adapters, top_k=1)
    variants = {"base": bench.base, **{name: _peft(bench.base, path) for name, path in bench.baselines.items()}}
    if checkpoint is not None:
        for k in (1, 2):
            model = MeteoraModel.from_pretrained(checkpoint, base_model=copy.deepcopy(bench.base))
            model.configure(top_k=k)
            variants[f"meteora top-{k}"] = model
    per_task = {name: accuracy_per_task(model, bench.tokenizer, bench.eval_sets, bench.metrics) for name, model in variants.items()}
    per_task["own adapter"] = {}
    for task, samples in bench.eval_sets.items():
        with fused.force_experts([task]):
            per_task["own adapter"][task] = task_accuracy(fused, bench.tokenizer, samples, bench.metrics[task])
    sizes = [n for n in composite_sizes if n <= len(bench.eval_sets)]
    composite = {name: _composite(model, bench, sizes, composite_count, composite_temperature) for name, model in variants.items()}
    composite["own adapter"] = {str(n): composite_oracle_scores(fused, bench.tokenizer, composite_problems(bench.eval_sets, n, composite_count),
                                                                bench.metrics) for n in sizes}
    router = variants.get("meteora top-2", fused)
    results = {"per_task": per_task, "composite": composite, "checkpoint": str(checkpoint) if checkpoint else None,
               "routing_example": _routing_example(router, bench, max(sizes, default=2))}
    if out_dir is not None:
        _write(results, Path(out_dir), trained=checkpoint is not None)
    return results


def _peft(base, path: Path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


def _composite(model, bench: Benchmark, sizes, count: int, temperature: float | None) -> dict:
    if temperature is not None and isinstance(model, MeteoraModel):
        model.configure(temperature=temperature)
    return {str(n): composite_scores(model, bench.tokenizer, composite_problems(bench.eval_sets, n, count), bench.metrics)
            for n in sizes}


def _routing_example(model: MeteoraModel, bench: Benchmark, n: int) -> dict:
    tasks, sample = composite_problems(bench.eval_sets, min(n, len(bench.eval_sets)), 1, seed=7)[0]
    inputs = prompt_batch(bench.tokenizer, [sample["prompt"]])
    out = model.generate(**inputs, max_new_tokens=12 * len(tasks), do_sample=False, return_routing=True,
                         pad_token_id=bench.tokenizer.pad_token_id, eos_token_id=bench.tokenizer.eos_token_id)
    tokens = bench.tokenizer.convert_ids_to_tokens(out.sequences[0, :-1].tolist())
    return {"tasks": tasks, "prompt": sample["prompt"], "reference": sample["response"], "tokens": tokens,
            "answer": bench.tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True),
            "expert_weights": out.routing.expert_weights()[0].tolist(), "experts": model.expert_names}


def _write(results: dict, out: Path, trained: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results["per_task"], results["composite"]))
    plot_accuracy(results["per_task"], out / "accuracy.png")
    example = results["routing_example"]
    title = f"routing of one composite generation ({', '.join(example['tasks'])})" + ("" if trained else " - gates untrained")
    plot_routing(torch.tensor(example["expert_weights"]), example["tokens"], example["experts"], title, out / "routing.png")
    log.info("evaluation written to %s", out)
