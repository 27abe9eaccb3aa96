"""Incremental registration: start a model's gates from an earlier checkpoint's, so that adding, updating or
removing adapters does not mean training every gate from scratch.

Row by row (expert e at adapted module m):
    copied  the checkpoint has a gate at m and an expert with e's name and weights (sha256): its trained row
    fresh   otherwise: a new expert, a changed one (same name, new weights), or a module the checkpoint never
            adapted (only new experts target it: every row of its gate starts fresh, at random)
A fresh row at a copied gate starts as the mean of the copied rows: a new expert begins as the average old one,
its logit the mean of theirs, rather than near 0 at random, above the low logits trained rows give other tasks'
tokens (on the real model it moved old tasks less: benchmarks/NOTES.md, "+2 adapters incrementally").
Experts the checkpoint has but the model does not (removed adapters) and modules no expert targets any more
are dropped. The base model's fingerprint must match. The WarmStart record says what was copied, per expert and
per module, and goes into the training summary of the new checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from ..model import MeteoraModel, read_checkpoint


@dataclass
class WarmStart:
    checkpoint: str
    experts: dict[str, str]  # expert -> "copied" (its trained rows, wherever the module existed) | "fresh"
    modules: dict[str, str]  # adapted module -> "copied" (its gate existed) | "new"
    copied_rows: dict[str, list[int]]  # adapted module -> indices of the experts whose row there was copied

    @property
    def new_experts(self) -> list[str]:
        return [name for name, how in self.experts.items() if how == "fresh"]

    def new_expert_ids(self, model: MeteoraModel) -> list[int]:
        """The fresh experts' indices in the model's expert order."""
        return [model.expert_names.index(name) for name in self.new_experts]

    def trainable_rows(self, model: MeteoraModel) -> list[torch.Tensor]:
        """Per gate (model order) a [E, 1] mask, 0 for copied rows, 1 for fresh ones: multiplying the gradients
        by it trains only the fresh rows (freeze_old)."""
        masks = []
        for name in model.layer_names:
            mask = torch.ones(len(model.expert_names), 1, device=model.device)
            mask[self.copied_rows[name]] = 0.0
            masks.append(mask)
        return masks

    def fresh_rows(self, model: MeteoraModel) -> dict[str, list[int]]:
        """Per module the rows that were not copied (the ones registration fits), in expert order."""
        experts = range(len(model.expert_names))
        return {name: [e for e in experts if e not in self.copied_rows[name]] for name in model.layer_names}

    def summary(self) -> dict:
        return {"init_from": self.checkpoint, "experts": self.experts, "modules": self.modules}


def init_gates_from(model: MeteoraModel, checkpoint: str) -> WarmStart:
    """Copy every gate row `checkpoint` holds for an expert and module the model shares with it (see above)."""
    meta, _, gates = read_checkpoint(checkpoint)
    if not model.base_info.fingerprint.matches(meta.base.fingerprint):  # taken before the layers were wrapped
        raise CheckpointError(f"--init-from {checkpoint}: it was trained on another base model ('{meta.base.name}')")
    old_rows = {(e.name, e.sha256): row for row, e in enumerate(meta.experts)}
    kept = {index: old_rows[(e.name, e.sha256)] for index, e in enumerate(model.experts) if (e.name, e.sha256) in old_rows}
    fresh = [index for index in range(len(model.experts)) if index not in kept]
    modules, copied_rows = {}, {}
    with torch.no_grad():
        for name, gate in zip(model.layer_names, model.gate_parameters()):
            old_gate = gates.get(f"{name}.gate")
            modules[name] = "new" if old_gate is None else "copied"
            copied_rows[name] = [] if old_gate is None else sorted(kept)
            for index in copied_rows[name]:
                gate[index] = old_gate[kept[index]].to(gate.device)
            if copied_rows[name] and fresh:
                gate[fresh] = gate[copied_rows[name]].mean(0)
    experts = {e.name: "copied" if index in kept else "fresh" for index, e in enumerate(model.experts)}
    return WarmStart(str(checkpoint), experts, modules, copied_rows)
