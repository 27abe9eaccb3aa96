"""The chattasks build's jobs, run in worker processes that each load the base once: a task's adapter, LoRA-B, the
merged baseline, exact match of the base or of an own adapter. The workers run at once, each on its share of the
CPU threads: on 2 cores, two workers of one thread train 1.5x as many steps a second as one worker of two
(experiments/FINDINGS.md, parallel_build.py). `train_adapter` is also what the tests call to train one adapter in-process."""
from __future__ import annotations

import copy
import gc
import time
from pathlib import Path

import torch

from meteora_moe import load_base_model, load_tokenizer
from meteora_moe.evaluation import task_accuracy

from ..baselines import merged_adapter
from . import lora
from .config import ChatTasksConfig
from .items import CHAT, adapter_items, task_data


_WORKER: dict = {}  # in a worker process: the base, its tokenizer, the config, the data and every task's items


def start_worker(base_file: Path, config: ChatTasksConfig, threads: int) -> None:
    torch.set_num_threads(threads)
    data = task_data(config)
    _WORKER.update(base=load_base_model(base_file).eval(), tokenizer=load_tokenizer(base_file), config=config,
                   data=data, items=adapter_items(data, config))


def train_adapter(base, tokenizer, config: ChatTasksConfig, task: str, items: list[lora.Item],
                  steps: int | None = None):
    """task's adapter (a PEFT model on a copy of base) trained on items by its recipe (steps: the recipe's unless
    given)."""
    index = config.tasks.index(task)
    recipe = config.recipes[index]
    model = lora.lora_model(base, recipe.rank, recipe.targets, recipe.rslora, config.seed + index)
    lora.train(model, tokenizer, CHAT, items, steps or recipe.steps, config.lr, config.batch, config.seed + index,
               config.bf16, config.pass_cost)
    return model


def adapter_job(out: Path, task: str) -> float:
    """Trains task's adapter into out/adapters/<task>; its seconds."""
    begun, w = time.perf_counter(), _WORKER
    model = train_adapter(w["base"], w["tokenizer"], w["config"], task, w["items"][task])
    model.save_pretrained(out / "adapters" / task)
    del model
    gc.collect()  # a PEFT model holds reference cycles: free this copy of the base before the next job
    return time.perf_counter() - begun


def lora_b_job(out: Path) -> float:
    """Trains LoRA-B (one LoRA on every task's items, the same count of each) into out/baselines/lora-b; its seconds."""
    begun, w = time.perf_counter(), _WORKER
    config = w["config"]
    model = lora.lora_model(w["base"], config.lora_b_rank, lora.QKVO + lora.MLP, False, config.seed + 99)
    balanced = [item for task in config.tasks for item in w["items"][task]]
    lora.train(model, w["tokenizer"], CHAT, balanced, config.lora_b_steps, config.lr, config.batch, config.seed + 99,
               config.bf16, config.pass_cost)
    model.save_pretrained(out / "baselines" / "lora-b")
    del model
    gc.collect()
    return time.perf_counter() - begun


def merged_job(out: Path) -> float:
    """Writes the merged baseline (the adapters' uniform average) into out/baselines/merged; its seconds."""
    begun = time.perf_counter()
    merged = merged_adapter(_WORKER["base"], out / "adapters", _WORKER["config"].tasks)
    merged.save_pretrained(out / "baselines" / "merged")
    return time.perf_counter() - begun


def measure_job(out: Path, task: str, own: bool) -> tuple[float, float]:
    """Exact match on task's first report_samples eval samples, of its own adapter (own) or of the base; its
    seconds."""
    from peft import PeftModel

    begun, w = time.perf_counter(), _WORKER
    model = w["base"]
    if own:
        model = PeftModel.from_pretrained(copy.deepcopy(model), out / "adapters" / task).eval()
    samples = w["data"][task][1][:w["config"].report_samples]
    return task_accuracy(model, w["tokenizer"], samples, CHAT), time.perf_counter() - begun
