"""The fused model: PEFT LoRA adapters in, a per-token routed mixture of experts out.

    adapters.py      reading PEFT adapters (LoraAdapter, per-expert ExpertInfo)
    experts.py       one layer's experts stacked at their own ranks (ExpertStack)
    routing.py       top-k routing settings shared by all layers, routing traces
    layer.py         MeteoraLinear: base nn.Linear + experts + gate
    backends/        loop (reference), torch (vectorized), triton: the experts' delta of one layer; fused_cpu:
                     CPU inference's routing and delta in one native call
    meteora_model.py MeteoraModel: from_adapters, from_pretrained, save_pretrained, generate, force_experts
    base_model.py    the base model and tokenizer from a directory (local or s3://), the runtime device and dtype
    gguf.py          a GGUF base model, converted once into a cached transformers directory
    fingerprint.py   BaseInfo: how a checkpoint references its base model
    checkpoint.py    the checkpoint's files
"""
from .adapters import ExpertInfo, LoraAdapter, LoraModule, load_adapter
from .backends import BACKENDS, check_backend
from .base_model import Precision, bf16_is_fast, load_base_model, load_tokenizer, model_dir, runtime, skeleton_from_config
from .checkpoint import CheckpointMeta, checkpoint_digest, checkpoint_exists, read_checkpoint, read_checkpoint_config
from .config import NAME_PATTERN, MeteoraConfig
from .experts import ExpertStack
from .fingerprint import BaseFingerprint, BaseInfo, structure_hash
from .gguf import is_gguf
from .layer import MeteoraLinear
from .meteora_model import GenerationWithRouting, MeteoraModel
from .routing import Routing, RoutingTrace

__all__ = [
    "BACKENDS",
    "BaseFingerprint",
    "BaseInfo",
    "CheckpointMeta",
    "ExpertInfo",
    "ExpertStack",
    "GenerationWithRouting",
    "LoraAdapter",
    "LoraModule",
    "MeteoraConfig",
    "MeteoraLinear",
    "MeteoraModel",
    "NAME_PATTERN",
    "Precision",
    "Routing",
    "RoutingTrace",
    "bf16_is_fast",
    "check_backend",
    "checkpoint_digest",
    "checkpoint_exists",
    "is_gguf",
    "load_adapter",
    "load_base_model",
    "load_tokenizer",
    "model_dir",
    "read_checkpoint",
    "read_checkpoint_config",
    "runtime",
    "skeleton_from_config",
    "structure_hash",
]
