"""meteora: many off-the-shelf LoRA adapters fused into one causal LM as a per-token mixture of experts.

    model = MeteoraModel.from_adapters(base, {"reverse": "adapters/reverse", ...}, top_k=2)
    with model.force_experts(["reverse"]): ...
    out = model.generate(**inputs, max_new_tokens=32, return_routing=True)

The flow, one subpackage per stage (each with its own __all__):
    meteora_moe.registry    manifest -> registry (adapters and task data collected from an object store)
    meteora_moe.model       the fused model, its checkpoint, its base model
    meteora_moe.training    gate training (one loop for one process or N data-parallel workers)
    meteora_moe.evaluation  per-task and composite-n tables and plots against the baselines
    meteora_moe.serving     continuous batching and the service an HTTP layer wraps
`import meteora_moe` loads torch, transformers and safetensors only; the parts that need peft, boto3, yaml or
matplotlib import them when used.
"""
from .errors import AdapterError, CheckpointError, ManifestError, RegistryError, RequestError, StoreError
from .model import (BACKENDS, ExpertInfo, ExpertStack, GenerationWithRouting, LoraAdapter, LoraModule, MeteoraConfig,
                    MeteoraLinear, MeteoraModel, RoutingTrace, load_adapter, load_base_model, load_tokenizer)
from .store import open_store
from .training import lm_labels, meteora_loss, routing_accuracy, task_labels

__all__ = [
    "AdapterError",
    "BACKENDS",
    "CheckpointError",
    "ExpertInfo",
    "ExpertStack",
    "GenerationWithRouting",
    "LoraAdapter",
    "LoraModule",
    "ManifestError",
    "MeteoraConfig",
    "MeteoraLinear",
    "MeteoraModel",
    "RegistryError",
    "RequestError",
    "RoutingTrace",
    "StoreError",
    "lm_labels",
    "load_adapter",
    "load_base_model",
    "load_tokenizer",
    "meteora_loss",
    "open_store",
    "routing_accuracy",
    "task_labels",
]
