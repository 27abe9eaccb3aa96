"""chattasks: natural-language tasks on a real instruct LLM (SmolLM2-135M-Instruct, offline from PyPI), in its chat
format, with one PEFT adapter per task and the paper's baselines, built here and cached by content.

    tasks.py    the tasks (instruction or form of the input), exactly scorable
    smollm2.py  where the installed package keeps the model's GGUF file and license
    lora.py     training one adapter on chat items (singles, and composites with the loss on its own line)
    config.py   each adapter's recipe and the build's settings (its cache key), the demo's subset
    items.py    each adapter's items, from the tasks' seeded samples
    jobs.py     the build's jobs (an adapter, a baseline, a measurement), run in worker processes
    build.py    building (or finding) the assets
"""
from .build import build
from .config import DEMO, RECIPES, ChatTasksConfig, Recipe
from .smollm2 import smollm2_files
from .tasks import TASKS, split_samples

__all__ = ["DEMO", "RECIPES", "TASKS", "ChatTasksConfig", "Recipe", "build", "smollm2_files", "split_samples"]
