"""The base causal LM: loading it from a model directory, and the fingerprint a checkpoint checks it by.

A checkpoint references its base model (never copies it) and must refuse a different one. The fingerprint
has two parts: `structure`, a hash of the model type and every parameter's name and shape, compared exactly;
and `probe`, a fixed sample of weight values compared with a tolerance, so the same weights loaded in
another dtype still match while a different model of the same architecture does not.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .store import local_dir

PROBE_TENSORS = 8  # matrices sampled, evenly spaced in name order
PROBE_VALUES = 16  # values sampled per matrix, evenly spaced in its flattened storage
PROBE_RTOL = 1e-2  # bf16 keeps ~3 significant digits; two different models differ far more than this


def load_base_model(uri: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a transformers causal LM from a model directory, local or s3:// (mirrored into the cache first;
    safetensors only, no remote code)."""
    return AutoModelForCausalLM.from_pretrained(
        _model_dir(uri), dtype=dtype or torch.float32, use_safetensors=True, trust_remote_code=False, local_files_only=True
    )


def load_tokenizer(uri: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in the base model's directory, local or s3:// (no remote code)."""
    return AutoTokenizer.from_pretrained(_model_dir(uri), trust_remote_code=False, local_files_only=True)


def _model_dir(uri: str | Path) -> Path:
    text = str(uri)
    if "://" in text and not text.startswith(("file://", "s3://")):
        raise ValueError(f"base model URI {text!r}: use a local directory, file:// or s3://")
    path = local_dir(text) if text.startswith("s3://") else Path(text.removeprefix("file://"))
    if not (path / "config.json").is_file():
        raise ValueError(f"base model {str(path)!r} is not a model directory: config.json is missing")
    return path


def structure_hash(model: nn.Module) -> str:
    """"sha256:<hex>" of the model type and every parameter's name and shape (works on a meta-device model)."""
    digest = hashlib.sha256(getattr(getattr(model, "config", None), "model_type", "").encode())
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(param.shape)};".encode())
    return f"sha256:{digest.hexdigest()}"


def skeleton_from_config(config: dict) -> PreTrainedModel:
    """The base model's modules and shapes without its weights (meta device): enough to validate adapters."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError("base model config.json has no model_type")
    fields = {k: v for k, v in config.items() if k != "model_type"}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields), trust_remote_code=False)


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

    @classmethod
    def from_info(cls, info: dict) -> "BaseFingerprint":
        """The fingerprint as a checkpoint's (or a model's) base_model record stores it."""
        return cls(structure=info["fingerprint"], probe=tuple(info["probe"]))

    def matches(self, other: "BaseFingerprint") -> bool:
        if self.structure != other.structure or len(self.probe) != len(other.probe):
            return False
        mine, theirs = torch.tensor(self.probe), torch.tensor(other.probe)
        scale = max(mine.abs().max().item(), 1e-12)
        return bool(torch.allclose(mine, theirs, rtol=PROBE_RTOL, atol=PROBE_RTOL * scale))


def _evenly_spaced(items, count: int):
    """`count` items at evenly spaced positions, first and last included (integer arithmetic: exact)."""
    n = len(items)
    positions = [i * (n - 1) // max(count - 1, 1) for i in range(min(count, n))]
    return items[torch.tensor(positions)] if isinstance(items, torch.Tensor) else [items[i] for i in positions]
