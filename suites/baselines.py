"""The merged baseline every suite builds: its adapters averaged into one PEFT adapter."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path


def merged_adapter(base, adapters: Path, tasks: list[str] | tuple[str, ...]):
    """The uniform average of the adapters' deltas (`adapters/<task>/`) as one adapter named "default" ("cat" keeps
    every rank and folds each adapter's scale into its rows, so it is exact). peft keys adapters by name inside
    ModuleDicts, so they load under neutral names (a task named "double" would clash with nn.Module.double)."""
    from peft import PeftModel

    names = [f"expert_{i}" for i in range(len(tasks))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(copy.deepcopy(base), adapters / tasks[0], adapter_name=names[0])
        for name, task in zip(names[1:], tasks[1:]):
            model.load_adapter(adapters / task, adapter_name=name)
        first = model.peft_config[names[0]]  # peft copies the merged adapter's config from the first adapter's
        first.use_rslora, first.layers_to_transform = False, _layers([model.peft_config[name] for name in names])
        model.add_weighted_adapter(names, [1.0 / len(tasks)] * len(tasks), "default", combination_type="cat")
        for name in names:
            model.delete_adapter(name)
    model.set_adapter("default")  # peft saves the adapter named "default" at the top of the directory
    return model


def _layers(configs) -> list[int] | None:
    """The layers any of the adapters transforms (None: every layer)."""
    chosen = [c.layers_to_transform for c in configs]
    if any(layers is None for layers in chosen):
        return None
    return sorted({layer for layers in chosen for layer in ([layers] if isinstance(layers, int) else layers)})
