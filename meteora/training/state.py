"""A gate-training checkpoint: the gates, the optimizer's state and the step, small and pickle-free.

    train_state.json       {"step", "expert_names", "layers", "extra": {...}}   (extra: whatever the trainer keeps)
    train_state.safetensors "<layer>.gate" [E, d_in] and, per layer, the optimizer's tensors "<layer>.<name>"
                            (Adam: exp_avg, exp_avg_sq, step)
Only the gates train, so this is a few hundred KB for a tiny model and a few MB for Llama-3-8B with 28 experts,
written every K steps. Restoring puts the gates and the optimizer back exactly, so a resumed run continues as
if it had never stopped.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..model import MeteoraModel

STATE_FILE = "train_state.json"
TENSORS_FILE = "train_state.safetensors"


def save_train_state(path: str | Path, model: MeteoraModel, optimizer: torch.optim.Optimizer, step: int,
                     extra: dict | None = None) -> None:
    path = Path(path)
    tensors = {}
    for name, gate in zip(model.layer_names, model.gate_parameters()):
        tensors[f"{name}.gate"] = gate.detach().cpu().contiguous()
        for key, value in optimizer.state.get(gate, {}).items():
            tensors[f"{name}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    save_file(tensors, path / TENSORS_FILE)
    state = {"step": step, "expert_names": model.expert_names, "layers": model.layer_names, "extra": extra or {}}
    (path / STATE_FILE).write_text(json.dumps(state, indent=2))


def load_train_state(path: str | Path, model: MeteoraModel, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore gates and optimizer state in place; returns (step, extra). Refuses a state of another model."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        tensors = load_file(path / TENSORS_FILE)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"training checkpoint {path} is unreadable: {err}") from None
    if state["expert_names"] != model.expert_names or state["layers"] != model.layer_names:
        raise CheckpointError(f"training checkpoint {path} is for experts {state['expert_names']}; "
                              f"this run trains {model.expert_names}: use another run name")
    with torch.no_grad():
        for name, gate in zip(model.layer_names, model.gate_parameters()):
            gate.copy_(tensors[f"{name}.gate"])
            prefix = f"{name}."
            saved = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix) and k != f"{name}.gate"}
            if saved:
                optimizer.state[gate] = {k: v.to(gate.device) if v.dim() else v for k, v in saved.items()}
    return state["step"], state["extra"]
