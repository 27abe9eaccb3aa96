"""Gate-training building blocks: the MeteoRA loss and routing accuracy.

    L = CE_LM + gate_weight * CE_gate
CE_LM is next-token cross-entropy (labels -100 ignored: padding, and prompt tokens when excluded).
CE_gate is the cross-entropy between every gate's logits (all adapted layers) and the token's task index,
averaged over layers and over tokens whose task label is not -100. The paper uses gate_weight = 50.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class MeteoraLoss:
    total: torch.Tensor
    lm: torch.Tensor
    gate: torch.Tensor


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Labels for CE_LM: input_ids with padding, and the first prompt_lengths[b] tokens of row b, set to -100.

    Rows are right-padded: row b's tokens are the first attention_mask[b].sum() positions.
    """
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    if prompt_lengths is not None:
        position = torch.arange(input_ids.shape[1], device=input_ids.device)  # [S]
        labels = labels.masked_fill(position < prompt_lengths.unsqueeze(1), IGNORE)  # [B, S]
    return labels


def task_labels(task_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token task labels [B, S]: row b's task index at every real token, -100 at padding."""
    return task_ids.unsqueeze(1).expand_as(attention_mask).masked_fill(attention_mask == 0, IGNORE)


def meteora_loss(lm_logits: torch.Tensor, labels: torch.Tensor, gate_logits: list[torch.Tensor],
                 token_tasks: torch.Tensor, gate_weight: float = 50.0) -> MeteoraLoss:
    """lm_logits [B, S, V], labels [B, S], gate_logits: per layer [B * S, E], token_tasks [B, S]."""
    if not gate_logits:
        raise ValueError("no gate logits were captured: run the forward pass inside model.capture_gate_logits()")
    lm = F.cross_entropy(lm_logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
    stacked = torch.stack(gate_logits)  # [L, B * S, E]
    targets = token_tasks.flatten().expand(stacked.shape[0], -1)  # [L, B * S]
    gate = F.cross_entropy(stacked.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    return MeteoraLoss(total=lm + gate_weight * gate, lm=lm, gate=gate)


@torch.no_grad()
def routing_accuracy(gate_logits: list[torch.Tensor], token_tasks: torch.Tensor) -> float:
    """Fraction of (layer, labelled token) pairs whose highest gate logit is the token's task."""
    picked = torch.stack(gate_logits).argmax(-1)  # [L, B * S]
    targets = token_tasks.flatten().expand_as(picked)
    keep = targets != IGNORE
    return (picked[keep] == targets[keep]).float().mean().item()
