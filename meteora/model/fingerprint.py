"""How a checkpoint references its base model: BaseInfo (name, URI, fingerprint), never a copy of the weights.

The fingerprint has two parts: `structure`, a hash of the model type and every parameter's name and shape,
compared exactly; and `probe`, a fixed sample of weight values compared with a tolerance, so the same weights
loaded in another dtype still match while a different model of the same architecture does not.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PROBE_TENSORS = 8  # matrices sampled, evenly spaced in name order
PROBE_VALUES = 16  # values sampled per matrix, evenly spaced in its flattened storage
PROBE_RTOL = 1e-2  # bf16 keeps ~3 significant digits; two different models differ far more than this


def structure_hash(model: nn.Module) -> str:
    """"sha256:<hex>" of the model type and every parameter's name and shape (works on a meta-device model)."""
    digest = hashlib.sha256(getattr(getattr(model, "config", None), "model_type", "").encode())
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(param.shape)};".encode())
    return f"sha256:{digest.hexdigest()}"


@dataclass(frozen=True)
class BaseFingerprint:
    structure: str  # "sha256:<hex>"
    probe: tuple[float, ...]

    @classmethod
    def of(cls, model: nn.Module) -> "BaseFingerprint":
        params = sorted(model.named_parameters(), key=lambda item: item[0])
        matrices = [param for _, param in params if param.dim() >= 2]
        probe = []
        for param in _evenly_spaced(matrices, PROBE_TENSORS):
            flat = param.detach().reshape(-1)
            probe.extend(float(f"{v:.6g}") for v in _evenly_spaced(flat, PROBE_VALUES).double().tolist())
        return cls(structure=structure_hash(model), probe=tuple(probe))

    def matches(self, other: "BaseFingerprint") -> bool:
        if self.structure != other.structure or len(self.probe) != len(other.probe):
            return False
        mine, theirs = torch.tensor(self.probe), torch.tensor(other.probe)
        scale = max(mine.abs().max().item(), 1e-12)
        return bool(torch.allclose(mine, theirs, rtol=PROBE_RTOL, atol=PROBE_RTOL * scale))


@dataclass(frozen=True)
class BaseInfo:
    """The base model a fused model was built on (meteora_config.json: base_model)."""

    name: str
    uri: str | None  # where to load it from; None for a model given in memory that came from no directory
    fingerprint: BaseFingerprint

    @classmethod
    def of(cls, model: nn.Module, uri: str | None) -> "BaseInfo":
        name = Path(uri.rstrip("/")).name if uri else getattr(model.config, "model_type", "base")
        return cls(name, uri, BaseFingerprint.of(model))

    def to_json(self) -> dict:
        return {"name": self.name, "uri": self.uri, "fingerprint": self.fingerprint.structure,
                "probe": list(self.fingerprint.probe)}

    @classmethod
    def from_json(cls, record: dict) -> "BaseInfo":
        return cls(record["name"], record.get("uri"), BaseFingerprint(record["fingerprint"], tuple(record["probe"])))


def _evenly_spaced(items, count: int):
    """`count` items at evenly spaced positions, first and last included (integer arithmetic: exact)."""
    n = len(items)
    positions = [i * (n - 1) // max(count - 1, 1) for i in range(min(count, n))]
    return items[torch.tensor(positions)] if isinstance(items, torch.Tensor) else [items[i] for i in positions]
