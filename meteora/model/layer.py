"""MeteoraLinear: a base nn.Linear plus N LoRA experts, mixed per token by a learned gate.

    y = base_layer(x) + sum_j w_j * s_e * B_e (A_e x),  e = top-k of G x,  w = softmax((G x)[e] / T)

The base layer is kept as `base_layer`, frozen and untouched. Trainable state is the gate only
(`meteora_gate`); the experts are buffers in `meteora_experts`. Shapes and symbols: meteora/model/experts.py.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .backends import fused_cpu, pick_backend
from .experts import ExpertStack
from .routing import Routing


class MeteoraLinear(nn.Module):
    def __init__(self, name: str, base_layer: nn.Linear, experts: ExpertStack, routing: Routing,
                 gate: torch.Tensor | None = None, generator: torch.Generator | None = None):
        super().__init__()
        self.name = name  # module path in the base model, the key of this layer in checkpoints and traces
        self.base_layer = base_layer
        self.meteora_experts = experts
        self.routing = routing
        if gate is None:  # nn.Linear's default init: logits start small and varied, so every expert gets picked
            bound = 1.0 / math.sqrt(base_layer.in_features)
            gate = torch.empty(experts.num_experts, base_layer.in_features).uniform_(-bound, bound, generator=generator)
        self.meteora_gate = nn.Parameter(gate.float().to(base_layer.weight.device))  # [E, d_in], fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # [..., d_out] in the base dtype
        if self.routing.backend == "auto" and fused_cpu.add_fused_delta(self, x, y):  # CPU inference: one native call
            return y
        x2 = x.reshape(-1, x.shape[-1])  # [T, d_in]
        ids, weights = self.routing.route(x2, self.meteora_gate)  # [T, k], [T, k]
        self.routing.record(self.name, ids, weights, x.shape[:-1])
        needs_grad = torch.is_grad_enabled() and self.meteora_gate.requires_grad
        delta_fn = pick_backend(self.routing.backend, x2, needs_grad)
        delta = delta_fn(x2, ids, weights, self.meteora_experts)  # [T, d_out]
        return y + delta.view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.meteora_experts.num_experts}, ranks={self.meteora_experts.rank_list}"
