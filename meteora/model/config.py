"""MeteoraConfig: the routing settings of a fused model, validated when built."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import AdapterError

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")  # expert names; they become paths in registries


@dataclass
class MeteoraConfig:
    top_k: int = 2  # experts applied per token at every adapted layer (the paper uses 2)
    temperature: float = 1.0  # softmax temperature over the k picked logits (the reference raises it for composite tasks)
    backend: str = "auto"  # "loop" (reference), "torch" (vectorized), "triton" (GPU kernels), "auto" (per device;
    # CPU inference: one native call per layer, backends/fused_cpu.py)

    def __post_init__(self):
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if not float(self.temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        self.temperature = float(self.temperature)

    def check_experts(self, n_experts: int) -> None:
        if self.top_k > n_experts:
            raise ValueError(f"top_k={self.top_k} is larger than the number of experts ({n_experts})")


def check_expert_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise AdapterError(
            f"adapter name {name!r} is invalid: use 1-63 characters of a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
