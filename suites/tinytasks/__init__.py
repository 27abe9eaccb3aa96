"""tinytasks: the embedded benchmark built here from nothing (a tiny character-level Llama trained to follow the
format, one PEFT adapter per task, the paper's baselines, task data and a manifest), cached by content.

    tasks.py           deterministic, exactly scorable tasks (28; 8 by default)
    char_tokenizer.py  the tiny models' tokenizer, saved in the standard format
    build.py           building (or finding) the assets
"""
from .build import TinyTasksConfig, build
from .char_tokenizer import char_tokenizer
from .tasks import ALL_TASKS, DEFAULT_TASKS, Task, split_samples

__all__ = ["ALL_TASKS", "DEFAULT_TASKS", "Task", "TinyTasksConfig", "build", "char_tokenizer", "split_samples"]
