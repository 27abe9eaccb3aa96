"""What chattasks' adapters train on: per task, its samples asked alone and composites in which one of them stands
among other tasks' problems (lora.Item: the loss on its own line only), each composite after `config.shots` worked
composites. All in the chat format, seeded by the config."""
from __future__ import annotations

import random

from meteora_moe.prompts import PromptFormat

from . import lora
from .config import ChatTasksConfig
from .tasks import split_samples


CHAT = PromptFormat("chat")


def task_data(config: ChatTasksConfig) -> dict[str, tuple[list[dict], list[dict]]]:
    """Per task: its (train, eval) samples."""
    return {task: split_samples(task, config.n_train, config.n_eval, config.seed) for task in config.tasks}


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
