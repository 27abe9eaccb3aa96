"""How data-parallel workers combine their shares of a step: a sum-all-reduce in place (a lone process: none).

Both gate-training methods use it: the SGD loop averages gradients, the fit sums each module's loss, gradient
and statistics over every worker's tokens (torch.distributed's all_reduce under Ray Train; None alone)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Collective:
    rank: int = 0
    world: int = 1
    all_reduce: Callable[[torch.Tensor], None] | None = None

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            self.all_reduce(tensor)
            tensor /= self.world
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            self.all_reduce(tensor)
        return tensor
