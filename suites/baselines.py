"""The merged baseline every suite builds: its adapters averaged into one PEFT adapter."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path


def merged_adapter(base, adapters: Path, tasks: list[str] | tuple[str, ...]):
    """The uniform average of the adapters' deltas (`adapters/<task>/`) as one adapter named "default" ("cat" keeps
    every rank, so it is exact). peft keys adapters by name inside ModuleDicts, so they load under neutral names
    (a task named "double" would clash with nn.Module.double)."""
    from peft import PeftModel

    names = [f"expert_{i}" for i in range(len(tasks))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(copy.deepcopy(base), adapters / tasks[0], adapter_name=names[0])
        for name, task in zip(names[1:], tasks[1:]):
            model.load_adapter(adapters / task, adapter_name=name)
        model.add_weighted_adapter(names, [1.0 / len(tasks)] * len(tasks), "default", combination_type="cat")
        for name in names:
            model.delete_adapter(name)
    model.set_adapter("default")  # peft saves the adapter named "default" at the top of the directory
    return model
