"""The evaluation harness: every variant of a registry's tasks, per task and on composite-n problems.

    variants  base | own adapter (each task's expert forced: the oracle; on composites, every sub-problem asked
              alone with its own expert) | lora-b | merged (the baselines asked for, from the registry) |
              meteora top-1 / top-2 (from a checkpoint, when given; on composites also top-2 at a raised routing
              temperature, when asked) | perfect routing (composites: every problem's tokens sent to its expert;
              on a single task that is the own adapter)
    outputs   results.json, results.md, accuracy.png, routing.png (one composite generation: tokens x experts)
Everything is read through the registry (adapters, eval data, baselines: what was collected and checked, not
what the manifest's sources hold now). Every variant answers the same prompts, in the adapters' prompt format
(the composites too: meteora_moe.prompts).
Progress: one INFO line on this module's logger per variant scored (its mean or summed score, its seconds).
"""
from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..batching import pad_left
from ..model import MeteoraModel, load_base_model, load_tokenizer, read_checkpoint_config
from ..prompts import PromptFormat, prompt_format
from ..registry import Registry, read_samples
from ..training import response_routing_accuracy
from .answers import (accuracy_per_task, composite_oracle_scores, composite_problems, composite_scores, composite_shots,
                      task_accuracy)
from .report import markdown_table, plot_accuracy, plot_routing
from .teacher import teacher_routed_scores

log = logging.getLogger(__name__)


@dataclass
class Benchmark:
    tokenizer: object
    base: object
    adapters: dict[str, Path]  # task -> PEFT dir, in expert order
    eval_sets: dict[str, list[dict]]
    metrics: dict[str, str]
    baselines: dict[str, Path]  # "lora-b" / "merged" -> PEFT dir
    fmt: PromptFormat  # how every prompt is written (the adapters' prompt format)


@dataclass(frozen=True)
class CompositeSettings:
    sizes: tuple[int, ...] = (3, 5)  # composite-n
    count: int = 40  # composites per n
    shots: int = 0  # worked composites before each question (the paper: 2); chat format only
    temperature: float | None = None  # also score MeteoRA top-2 at this routing temperature (the paper raises it)


def load_benchmark(registry: Registry, tasks: list[str] | None = None, baselines: list[str] = (),
                   samples: int | None = None) -> Benchmark:
    """The registry's base model, the adapters and eval data of `tasks` (default: all, in registry order) and the
    `baselines` asked for, all as the registry holds them; `samples`: the first eval samples of each task."""
    tasks = list(tasks or registry.names)
    missing = sorted(set(tasks) - set(registry.names))
    if missing:
        raise ValueError(f"registry {registry.uri}: unknown tasks {missing}; it holds {registry.names}")
    no_eval = [name for name in tasks if "eval" not in registry.entry(name).get("data", {})]
    if no_eval:
        raise ValueError(f"registry {registry.uri}: adapters {no_eval} have no eval data (data.eval in their manifest)")
    eval_sets = {name: read_samples(registry.data_file(name, "eval").read_bytes(), f"{name}'s eval data")[:samples]
                 for name in tasks}
    return Benchmark(
        tokenizer=load_tokenizer(registry.base_model["uri"]),
        base=load_base_model(registry.base_model["uri"]).eval(),
        adapters=registry.adapter_dirs(tasks),
        eval_sets=eval_sets,
        metrics={name: registry.entry(name).get("metric", "exact_match") for name in tasks},
        baselines=registry.baseline_dirs(list(baselines)),
        fmt=prompt_format(registry.prompt_format(tasks)),
    )


def evaluate(bench: Benchmark, checkpoint: str | Path | None = None, composites: CompositeSettings = CompositeSettings(),
             out_dir: str | Path | None = None, baselines: bool = True) -> dict:
    """Every variant (module docstring); baselines=False: the checkpoint's MeteoRA rows only (to set beside
    baselines scored once for several checkpoints of the same experts)."""
    if not baselines and checkpoint is None:
        raise ValueError("evaluate(baselines=False) scores a checkpoint's rows: give a checkpoint")
    fused = MeteoraModel.from_adapters(copy.deepcopy(bench.base), bench.adapters, top_k=1, prompt_format=bench.fmt.name)
    variants = {"base": bench.base, **{name: _peft(bench.base, path) for name, path in bench.baselines.items()}}
    variants = variants if baselines else {}
    if checkpoint is not None:
        experts = [expert.name for expert in read_checkpoint_config(checkpoint).experts]
        missing = sorted(set(bench.eval_sets) - set(experts))  # before any scoring, not after most of it
        if missing:
            raise ValueError(f"checkpoint {checkpoint} has no experts for the tasks {missing} (it has {experts})")
        for k in range(1, min(2, len(experts)) + 1):  # one expert: top-1 only
            model = MeteoraModel.from_pretrained(checkpoint, base_model=copy.deepcopy(bench.base))
            model.configure(top_k=k)
            variants[f"meteora top-{k}"] = model
    per_task = {name: _logged(f"{name}, per task", lambda model=model: accuracy_per_task(
        model, bench.tokenizer, bench.eval_sets, bench.fmt, bench.metrics)) for name, model in variants.items()}
    if baselines:
        per_task["own adapter"] = _logged("own adapter, per task", lambda: _own_accuracy(fused, bench))
    results = {"per_task": per_task, "composite": _composites(bench, variants, fused, composites, baselines),
               "checkpoint": str(checkpoint) if checkpoint else None, "prompt_format": bench.fmt.name}
    router = variants.get("meteora top-2", variants.get("meteora top-1", fused))
    if checkpoint is not None:
        items = [(sample, router.expert_names.index(task)) for task, samples in bench.eval_sets.items() for sample in samples]
        started = time.perf_counter()
        results["routing_accuracy"] = response_routing_accuracy(router, bench.tokenizer, items, bench.fmt)
        log.info("routing accuracy on eval responses: %.3f (%.0f s)", results["routing_accuracy"],
                 time.perf_counter() - started)
    results["routing_example"] = _routing_example(router, bench, max(composites.sizes, default=2))
    if out_dir is not None:
        _write(results, Path(out_dir), trained=checkpoint is not None)
    return results


def _composites(bench: Benchmark, variants: dict, fused: MeteoraModel, settings: CompositeSettings,
                baselines: bool = True) -> dict:
    """{variant: {"n": scores}} on the same composites for every variant (with baselines: perfect routing and the
    oracle too)."""
    results: dict[str, dict] = {name: {} for name in variants}
    for n in [n for n in settings.sizes if n <= len(bench.eval_sets)]:
        problems = composite_problems(bench.eval_sets, n, settings.count, bench.fmt)
        shots = composite_shots(bench.eval_sets, n, settings.shots, bench.fmt, problems) if settings.shots else ()
        args = (bench.tokenizer, problems, bench.metrics, bench.fmt)

        def scored(name: str, scoring: Callable[[], dict]) -> None:
            results.setdefault(name, {})[str(n)] = _logged(f"{name}, composite-{n}", scoring, composite=True)

        for name, model in variants.items():
            scored(name, lambda model=model: composite_scores(model, *args, shots))
        routed = variants.get("meteora top-2")
        if routed is not None:
            if settings.temperature is not None:
                with routed.configured(temperature=settings.temperature):
                    scored(f"meteora top-2 T={settings.temperature:g}", lambda: composite_scores(routed, *args, shots))
            if baselines:
                scored("perfect routing", lambda: teacher_routed_scores(routed, *args, shots))
        if baselines:
            scored("own adapter", lambda: composite_oracle_scores(fused, *args))
    return results


def _own_accuracy(fused: MeteoraModel, bench: Benchmark) -> dict[str, float]:
    """{task: accuracy} with each task's own expert forced: the oracle on single tasks."""
    accuracy = {}
    for task, samples in bench.eval_sets.items():
        with fused.force_experts([task]):
            accuracy[task] = task_accuracy(fused, bench.tokenizer, samples, bench.fmt, bench.metrics[task])
    return accuracy


def _logged(label: str, scoring: Callable[[], dict], composite: bool = False) -> dict:
    """scoring()'s result, and a progress line: a composite's summed score, or the mean over the tasks."""
    started = time.perf_counter()
    scores = scoring()
    value = scores["summed"] if composite else sum(scores.values()) / len(scores)
    log.info("%s: %.3f (%.0f s)", label, value, time.perf_counter() - started)
    return scores


def _peft(base, path: Path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


def _routing_example(model: MeteoraModel, bench: Benchmark, n: int) -> dict:
    problem = composite_problems(bench.eval_sets, min(n, len(bench.eval_sets)), 1, bench.fmt, seed=7)[0]
    inputs = pad_left([bench.fmt.prompt_ids(bench.tokenizer, problem.joined.prompt)], bench.tokenizer.pad_token_id)
    out = model.generate(**inputs, max_new_tokens=16 * len(problem.tasks), do_sample=False, return_routing=True,
                         pad_token_id=bench.tokenizer.pad_token_id, eos_token_id=bench.tokenizer.eos_token_id)
    tokens = bench.tokenizer.convert_ids_to_tokens(out.sequences[0, :-1].tolist())
    return {"tasks": problem.tasks, "prompt": problem.joined.prompt, "reference": problem.joined.response, "tokens": tokens,
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
