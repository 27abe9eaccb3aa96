"""Incremental registration: start a model's gates from an earlier checkpoint's, so adding adapters does not
mean training every gate from scratch.

An expert keeps its trained gate row when the earlier checkpoint holds an expert with the same name and the
same weights (sha256); other experts (new ones, or changed ones) keep their fresh rows and are reported as new.
`old_rows_mask` then lets a trainer freeze the kept rows and train only the new ones.
"""
from __future__ import annotations

import torch

from .base_model import BaseFingerprint
from .checkpoint import read_checkpoint
from .errors import CheckpointError
from .model import MeteoraModel


def init_gates_from(model: MeteoraModel, checkpoint: str) -> list[str]:
    """Copy the trained gate rows of experts `checkpoint` shares with `model`; returns the names of the new experts."""
    meta, _, gates = read_checkpoint(checkpoint)
    stored = meta["base_model"]  # model.base_info: the fingerprint taken before the layers were wrapped
    if not BaseFingerprint.from_info(model.base_info).matches(BaseFingerprint.from_info(stored)):
        raise CheckpointError(f"--init-from {checkpoint}: it was trained on another base model ('{stored['name']}')")
    missing = [name for name in model.layer_names if f"{name}.gate" not in gates]
    if missing:
        raise CheckpointError(f"--init-from {checkpoint}: it has no gates for layers {missing[:3]}; "
                              "the adapters' target modules changed, so train from scratch")
    old = {(e["name"], e["sha256"]): row for row, e in enumerate(meta["experts"])}
    kept = {index: old[(e["name"], e["sha256"])] for index, e in enumerate(model.experts) if (e["name"], e["sha256"]) in old}
    with torch.no_grad():
        for name, gate in zip(model.layer_names, model.gate_parameters()):
            for index, row in kept.items():
                gate[index] = gates[f"{name}.gate"][row].to(gate.device)
    return [e["name"] for index, e in enumerate(model.experts) if index not in kept]


def old_rows_mask(model: MeteoraModel, new_experts: list[str]) -> torch.Tensor:
    """[E, 1] float mask, 0 for the rows of experts carried over, 1 for new ones: multiply gate gradients by it."""
    return torch.tensor([[float(name in new_experts)] for name in model.expert_names], device=model.device)
