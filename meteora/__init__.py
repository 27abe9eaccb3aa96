"""meteora: many off-the-shelf LoRA adapters fused into one causal LM as a per-token mixture of experts.

    model = MeteoraModel.from_adapters(base, {"reverse": "adapters/reverse", ...}, top_k=2)
    with model.force_experts(["reverse"]): ...
    out = model.generate(**inputs, max_new_tokens=32, return_routing=True)
"""
from .adapters import LoraAdapter, LoraModule, load_adapter
from .async_engine import AsyncEngine
from .backends import BACKENDS
from .base_model import BaseFingerprint, load_base_model, load_tokenizer
from .config import MeteoraConfig
from .errors import AdapterError, CheckpointError
from .experts import ExpertStack
from .generation_engine import GenerationEngine, SamplingParams, TokenEvent
from .layer import MeteoraLinear
from .manifest import AdapterSpec, Manifest, ManifestError, load_manifest
from .model import GenerationWithRouting, MeteoraModel
from .registry import Registry, RegistryError
from .routing import RoutingTrace
from .store import StoreError, open_store
from .training import MeteoraLoss, lm_labels, meteora_loss, routing_accuracy, task_labels

__all__ = [
    "AdapterError",
    "AdapterSpec",
    "AsyncEngine",
    "BACKENDS",
    "BaseFingerprint",
    "CheckpointError",
    "ExpertStack",
    "GenerationEngine",
    "GenerationWithRouting",
    "LoraAdapter",
    "LoraModule",
    "Manifest",
    "ManifestError",
    "MeteoraConfig",
    "MeteoraLinear",
    "MeteoraLoss",
    "MeteoraModel",
    "Registry",
    "RegistryError",
    "RoutingTrace",
    "SamplingParams",
    "StoreError",
    "TokenEvent",
    "lm_labels",
    "load_adapter",
    "load_base_model",
    "load_manifest",
    "load_tokenizer",
    "meteora_loss",
    "open_store",
    "routing_accuracy",
    "task_labels",
]
