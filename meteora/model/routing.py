"""Per-token routing: the settings every fused layer shares, and the routing trace they record.

    logits = G x                       # [T, E]  one gate per adapted layer
    vals, ids = topk(logits, k)        # [T, k]
    weights = softmax(vals / temperature)
Forcing bypasses the gates: every token uses the forced experts with equal weights; teacher routing
(token_experts) sends each token of one forward to a given expert with weight 1, or leaves it to the gates (-1).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    """Mutable settings shared by reference by all fused layers of one model."""

    top_k: int
    temperature: float
    backend: str
    forced: torch.Tensor | None = None  # [m] expert ids, or None to route with the gates
    token_experts: torch.Tensor | None = None  # [T] expert id per token of the next forwards, -1: the gates (teacher routing)
    gate_logits: list[torch.Tensor] | None = None  # when a list, every layer appends its [T, E] logits (training)
    recorder: "RoutingRecorder | None" = None  # when set, every layer records its routing of every call

    def route(self, x: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d_in], gate [E, d_in] -> ids [T, k] int64, weights [T, k] fp32."""
        T = x.shape[0]
        if self.token_experts is not None:
            return self._teacher_route(x, gate)
        if self.forced is not None:
            m = self.forced.numel()
            ids = self.forced.to(x.device).expand(T, m)  # [T, m]
            return ids, torch.full((T, m), 1.0 / m, device=x.device)
        return self._gate_route(x, gate)

    def _gate_route(self, x: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), gate.float())  # [T, E] in fp32, whatever dtype the model was cast to
        if self.gate_logits is not None:
            self.gate_logits.append(logits)
        vals, ids = logits.topk(self.top_k, dim=-1)  # [T, k]
        if self.temperature != 1.0:
            vals = vals / self.temperature
        return ids, torch.softmax(vals, dim=-1)

    def _teacher_route(self, x: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """token_experts' expert at weight 1 where it is >= 0; the gates' top-k elsewhere."""
        T, teacher = x.shape[0], self.token_experts.to(x.device)
        if teacher.numel() != T:
            raise ValueError(f"teacher routing has {teacher.numel()} expert ids for {T} tokens")
        taught = (teacher >= 0).view(T, 1)
        if bool(taught.all()):
            return teacher.view(T, 1), torch.ones(T, 1, device=x.device)
        ids, weights = self._gate_route(x, gate)  # [T, k]
        sole = torch.zeros_like(weights)
        sole[:, 0] = 1.0  # a taught token: its expert in the first slot at weight 1, the other slots at weight 0
        return torch.where(taught, teacher.view(T, 1), ids), torch.where(taught, sole, weights)

    def record(self, layer: str, ids: torch.Tensor, weights: torch.Tensor, shape: torch.Size) -> None:
        """Keep ids and weights [*shape, k] of one call when a trace is being recorded."""
        if self.recorder is not None:
            self.recorder.add(layer, ids.view(*shape, -1), weights.view(*shape, -1))

    @contextlib.contextmanager
    def recording(self, layers: list[str], expert_names: list[str]):
        """Inside the block every routed call is recorded; the yielded recorder turns them into a RoutingTrace."""
        self.recorder = RoutingRecorder(layers, expert_names)
        try:
            yield self.recorder
        finally:
            self.recorder = None


@dataclass
class RoutingTrace:
    """The experts picked at every adapted layer for every position a forward pass processed.

    ids / weights [B, P, L, k]: batch row, position, adapted layer (order of `layers`), pick.
    After `generate`, position P - n + i (n generated tokens) is the input whose routing produced
    generated token i: `for_generated(n)` returns exactly those.
    """

    expert_names: list[str]
    layers: list[str]
    ids: torch.Tensor
    weights: torch.Tensor

    def expert_weights(self) -> torch.Tensor:
        """[B, P, E]: each expert's routing weight at each position, averaged over the adapted layers."""
        B, P, L, k = self.ids.shape
        dense = torch.zeros(B, P, L, len(self.expert_names))
        dense.scatter_add_(-1, self.ids, self.weights)  # [B, P, L, E]
        return dense.mean(dim=2)

    def for_generated(self, n: int) -> "RoutingTrace":
        """The last n positions (n from 0 to P): those of the n generated tokens."""
        positions = self.ids.shape[1]
        if not 0 <= n <= positions:
            raise ValueError(f"for_generated needs 0 <= n <= {positions} (the positions traced), got {n}")
        return RoutingTrace(self.expert_names, self.layers, self.ids[:, positions - n:], self.weights[:, positions - n:])

    def top_experts(self, row: int = 0) -> list[list[tuple[str, float]]]:
        """Per position of batch row `row`: experts by mean weight (those above zero), heaviest first."""
        result = []
        for position in self.expert_weights()[row]:  # [E]
            order = position.argsort(descending=True)
            result.append([(self.expert_names[e], round(position[e].item(), 4)) for e in order if position[e] > 0])
        return result


class RoutingRecorder:
    """The routing of every call of every layer while recording (generate, or one engine step)."""

    def __init__(self, layers: list[str], expert_names: list[str]):
        self.layers, self.expert_names = layers, expert_names
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> [(ids, weights)] per call

    def add(self, layer: str, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.calls.setdefault(layer, []).append((ids.detach().cpu(), weights.detach().float().cpu()))

    def trace(self, batch: int) -> RoutingTrace:
        """Join the calls into one trace: all positions of the first call (the prompt), then the last position of
        each later call (one new token per step, with or without a KV cache)."""
        return _assemble(self.calls, self.layers, self.expert_names, batch)


def _assemble(records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], layers: list[str],
              expert_names: list[str], batch: int) -> RoutingTrace:
    per_layer_ids, per_layer_weights = [], []
    for layer in layers:
        calls = records[layer]
        ids = [calls[0][0].view(batch, -1, calls[0][0].shape[-1])]
        weights = [calls[0][1].view(batch, -1, calls[0][1].shape[-1])]
        for call_ids, call_weights in calls[1:]:
            ids.append(call_ids.view(batch, -1, call_ids.shape[-1])[:, -1:])
            weights.append(call_weights.view(batch, -1, call_weights.shape[-1])[:, -1:])
        per_layer_ids.append(torch.cat(ids, dim=1))  # [B, P, k]
        per_layer_weights.append(torch.cat(weights, dim=1))
    return RoutingTrace(expert_names, layers, torch.stack(per_layer_ids, 2), torch.stack(per_layer_weights, 2))
