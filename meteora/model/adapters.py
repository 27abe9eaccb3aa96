"""Reading off-the-shelf PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors).

A PEFT adapter stores, for every module it targets, `lora_A` [r, d_in] and `lora_B` [d_out, r] under keys
like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, and its config gives the scaling:
alpha / r, or alpha / sqrt(r) with rsLoRA, with optional per-module overrides (rank_pattern, alpha_pattern);
a config without lora_alpha has PEFT's default alpha (LoraConfig's, 8), as PEFT itself would load it.
Only safetensors are read: a pickle-only adapter (adapter_model.bin) is refused, never unpickled.
A fused model records each adapter as an ExpertInfo (what its checkpoint's experts[] hold).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from .config import check_expert_name
from ..errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")

# PEFT features that change what a LoRA module computes; an adapter using one is not a plain LoRA.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters are not plain LoRA",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D bases such as GPT-2) is not supported: only nn.Linear",
    "lora_bias": "LoRA bias terms are not supported",
    "modules_to_save": "modules_to_save (full copies of base modules) cannot be mixed per token",
    "layer_replication": "layer_replication changes the base model's structure",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "target_parameters": "LoRA on raw parameters is not supported: only nn.Linear modules",
    "use_qalora": "QA-LoRA is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer of one adapter."""

    A: torch.Tensor  # [r, d_in]
    B: torch.Tensor  # [d_out, r]
    scaling: float  # alpha / r, or alpha / sqrt(r) with rsLoRA

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class ExpertInfo:
    """One expert of a fused model, as its checkpoint records it (meteora_config.json: experts[])."""

    name: str
    sha256: str  # of adapter_model.safetensors
    rank: int
    alpha: float
    scaling: float
    target_modules: tuple[str, ...]
    source: str | None = None  # where the adapter was read from
    prompt_format: str = "plain"  # how its training samples were written (meteora_moe.prompts): plain | chat

    def to_json(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_json(cls, record: dict) -> "ExpertInfo":
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in record.items() if k in known},
                      "target_modules": tuple(record.get("target_modules", ()))})


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter read from disk: its settings and its factors per module path."""

    name: str
    source: str  # where it was read from
    sha256: str  # of adapter_model.safetensors
    rank: int  # nominal r from the config (per-module ranks may differ through rank_pattern)
    alpha: float
    use_rslora: bool
    modules: dict[str, LoraModule]  # module path in the base model ("model.layers.0.self_attn.q_proj") -> factors

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    @property
    def target_modules(self) -> list[str]:
        """Module names as PEFT's target_modules spells them (the last path component), sorted."""
        return sorted({path.rsplit(".", 1)[-1] for path in self.modules})

    def info(self, prompt_format: str = "plain") -> ExpertInfo:
        return ExpertInfo(self.name, self.sha256, self.rank, self.alpha, self.scaling, tuple(self.target_modules),
                          self.source, prompt_format)

    def validate_against(self, base: nn.Module) -> None:
        """Every targeted module exists in `base`, is an nn.Linear, and has the adapter's shapes."""
        for path, module in self.modules.items():
            try:
                layer = base.get_submodule(path)
            except AttributeError:
                raise AdapterError(f"adapter '{self.name}': targets module '{path}', which the base model lacks") from None
            layer = getattr(layer, "base_layer", layer)  # already wrapped by a MeteoraLinear
            if not isinstance(layer, nn.Linear):
                raise AdapterError(
                    f"adapter '{self.name}': module '{path}' is a {type(layer).__name__}; only nn.Linear is supported"
                )
            if module.A.shape[1] != layer.in_features or module.B.shape[0] != layer.out_features:
                raise AdapterError(
                    f"adapter '{self.name}': shape mismatch at '{path}': lora_A {list(module.A.shape)} and "
                    f"lora_B {list(module.B.shape)} do not fit a Linear({layer.in_features} -> {layer.out_features}); "
                    "is this adapter made for another base model?"
                )


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return float(alpha / (math.sqrt(rank) if use_rslora else rank))


def load_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter directory. Raises AdapterError naming the adapter and the problem."""
    path = Path(path)
    name = path.name if name is None else name
    check_expert_name(name)
    if not path.is_dir():
        raise AdapterError(f"adapter '{name}': {path} is not a directory")
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file():
        raise AdapterError(f"adapter '{name}': missing {config_file}")
    if not weights_file.is_file():
        if (path / PICKLE_WEIGHTS_FILE).is_file():
            raise pickle_only_error(name)
        raise AdapterError(f"adapter '{name}': missing {weights_file}")
    return adapter_from_bytes(name, str(path), config_file.read_bytes(), weights_file.read_bytes())


def pickle_only_error(name: str) -> AdapterError:
    return AdapterError(
        f"adapter '{name}': only {PICKLE_WEIGHTS_FILE} (a pickle) is present; pickles are never loaded. "
        f"Re-save it with peft's save_pretrained(safe_serialization=True) to get {WEIGHTS_FILE}"
    )


def adapter_from_bytes(name: str, source: str, config_bytes: bytes, weights_bytes: bytes) -> LoraAdapter:
    """Parse and check an adapter from the bytes of its two files (as fetched from any store)."""
    check_expert_name(name)
    config = _parse_config(name, source, config_bytes)
    try:
        tensors = load_safetensors(weights_bytes)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise AdapterError(f"adapter '{name}': {WEIGHTS_FILE} is unreadable (truncated or corrupt): {err}") from None
    return LoraAdapter(
        name=name,
        source=source,
        sha256=hashlib.sha256(weights_bytes).hexdigest(),
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        use_rslora=bool(config.get("use_rslora", False)),
        modules=_parse_modules(name, config, tensors),
    )


def _peft_default_alpha() -> float:
    """The lora_alpha PEFT gives an adapter whose config has none: LoraConfig's default."""
    from peft import LoraConfig

    return next(f.default for f in fields(LoraConfig) if f.name == "lora_alpha")


def _parse_config(name: str, source: str, data: bytes) -> dict:
    """The adapter's config, checked, with lora_alpha filled in with PEFT's default where it is absent."""
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"adapter '{name}': {CONFIG_FILE} in {source} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter '{name}': {CONFIG_FILE} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter '{name}': peft_type is {config['peft_type']!r}; only LORA adapters can be fused")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"adapter '{name}': field 'r' in {CONFIG_FILE} must be a positive integer, got {r!r}")
    if "lora_alpha" not in config:
        config["lora_alpha"] = _peft_default_alpha()
    alpha = config["lora_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise AdapterError(f"adapter '{name}': field 'lora_alpha' in {CONFIG_FILE} must be a number, got {alpha!r}")
    for field, reason in _UNSUPPORTED.items():
        if config.get(field):
            raise AdapterError(f"adapter '{name}': field '{field}' is set: {reason}")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter '{name}': field 'bias' is {config['bias']!r}: trained biases are not supported")
    return config


def _parse_modules(name: str, config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, LoraModule]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"adapter '{name}': unsupported tensor '{key}' (only lora_A / lora_B of Linear modules)")
        if not tensor.is_floating_point() or tensor.dim() != 2:
            raise AdapterError(f"adapter '{name}': tensor '{key}' must be a 2-D float matrix, got {tensor.dtype} {list(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"adapter '{name}': tensor '{key}' holds NaN or infinite values")
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    if not factors:
        raise AdapterError(f"adapter '{name}': {WEIGHTS_FILE} holds no LoRA weights")
    return {path: _module(name, config, path, pair) for path, pair in sorted(factors.items())}


def _module(name: str, config: dict, path: str, pair: dict[str, torch.Tensor]) -> LoraModule:
    if set(pair) != {"A", "B"}:
        missing = ({"A", "B"} - set(pair)).pop()
        raise AdapterError(f"adapter '{name}': module '{path}' has no lora_{missing} weight")
    A, B = pair["A"], pair["B"]
    if A.shape[0] != B.shape[1]:
        raise AdapterError(f"adapter '{name}': module '{path}': lora_A {list(A.shape)} and lora_B {list(B.shape)} ranks differ")
    rank = _per_module(config, "rank_pattern", path, config["r"])
    alpha = _per_module(config, "alpha_pattern", path, config["lora_alpha"])
    if A.shape[0] != rank:
        raise AdapterError(f"adapter '{name}': module '{path}' has rank {A.shape[0]} but the config says r={rank}")
    return LoraModule(A=A, B=B, scaling=lora_scaling(alpha, rank, config.get("use_rslora", False)))


def _per_module(config: dict, pattern_field: str, path: str, default):
    """The value rank_pattern / alpha_pattern gives module `path`, matched by PEFT's own rule; else `default`."""
    pattern = config.get(pattern_field) or {}
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(pattern.keys(), path), default)
