"""MeteoraModel: a transformers causal LM whose adapted nn.Linear layers become MeteoraLinear mixtures.

    base LM ──► every Linear that some adapter targets ──► MeteoraLinear(base_layer, experts, gate)
                                 shared Routing settings (top_k, temperature, backend, forcing, trace)

The base model is changed in place (its Linear layers wrapped, their weights untouched) and frozen; only
the gates train. Everything is loaded and checked before the first layer is wrapped, so a failure leaves
the base model as it was.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import AdapterError, CheckpointError, InvalidRequest, UnknownExpert
from ..prompts import PromptFormat, prompt_format
from ..store import absolute_uri
from .adapters import ExpertInfo, LoraAdapter, load_adapter
from .backends import check_backend
from .base_model import load_base_model
from .checkpoint import CheckpointMeta, read_checkpoint, write_checkpoint
from .config import MeteoraConfig
from .experts import ExpertStack
from .fingerprint import BaseFingerprint, BaseInfo
from .layer import MeteoraLinear
from .routing import Routing, RoutingTrace

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# {name: adapter dir}, [LoraAdapter | (name, dir)], or anything with adapter_dirs() -> {name: dir} (a Registry)
AdapterSource = Mapping[str, "str | Path"] | Sequence["LoraAdapter | tuple[str, str | Path]"]


@dataclass
class GenerationWithRouting:
    sequences: torch.Tensor  # [B, S_prompt + n] like transformers' generate
    routing: RoutingTrace  # every processed position; .for_generated(n) gives the n generated tokens


class MeteoraModel(nn.Module):
    def __init__(self, base: "PreTrainedModel", stacks: dict[str, ExpertStack], experts: list[ExpertInfo],
                 config: MeteoraConfig, base_info: BaseInfo, gates: dict[str, torch.Tensor] | None = None,
                 training: dict | None = None, seed: int = 0):
        super().__init__()
        self.base_model = base
        self.experts = experts  # in expert order
        formats = sorted({e.prompt_format for e in experts})
        if len(formats) != 1:
            raise AdapterError(f"the experts were trained in different prompt formats {formats}: fuse adapters of one format")
        self.prompt_format: PromptFormat = prompt_format(formats[0])  # how prompts are written for every expert
        self.base_info = base_info  # fingerprinted before any layer was wrapped
        self.training_summary = training or {}
        self.routing = Routing(config.top_k, config.temperature, check_backend(config.backend))
        base.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        self.layers: dict[str, MeteoraLinear] = {}
        for name, stack in stacks.items():
            parent_name, _, attr = name.rpartition(".")
            parent = base.get_submodule(parent_name)
            linear = getattr(parent, attr)
            gate = None if gates is None else gates[name]
            layer = MeteoraLinear(name, linear, stack.to(linear.weight.device), self.routing, gate, generator)
            setattr(parent, attr, layer)
            self.layers[name] = layer

    # ---- building -------------------------------------------------------------------------------------
    @classmethod
    def from_adapters(cls, base: "PreTrainedModel | str | Path", adapters: AdapterSource, top_k: int = 2,
                      temperature: float = 1.0, backend: str = "auto", dtype: torch.dtype | None = None,
                      seed: int = 0, prompt_format: str | None = None) -> "MeteoraModel":
        """Fuse `adapters` ({name: dir}, LoraAdapters, or a Registry; expert order = their order) into `base`,
        with freshly initialized gates. prompt_format: how the adapters were trained (plain | chat); by default
        what a Registry records for them, else plain."""
        config = MeteoraConfig(top_k=top_k, temperature=temperature, backend=backend)
        check_backend(backend)  # fail fast, before any adapter is read
        formats = _registry_formats(adapters) if prompt_format is None else {}
        loaded = _load_adapters(adapters)
        config.check_experts(len(loaded))
        base, uri = _base(base, dtype)
        for adapter in loaded:
            adapter.validate_against(base)
        layer_names = [n for n, _ in base.named_modules() if any(n in a.modules for a in loaded)]
        stacks = {
            name: ExpertStack.from_modules([a.modules.get(name) for a in loaded], base.get_submodule(name).weight.dtype)
            for name in layer_names
        }
        infos = [a.info(prompt_format or formats.get(a.name, "plain")) for a in loaded]
        return cls(base, stacks, infos, config, BaseInfo.of(base, uri), seed=seed)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, base_model: "PreTrainedModel | str | Path | None" = None,
                        backend: str = "auto", dtype: torch.dtype | None = None) -> "MeteoraModel":
        """Load a checkpoint written by save_pretrained onto its base model (by default the one at its URI).
        The checkpoint and the settings are checked before the base model is loaded."""
        meta, expert_tensors, gate_tensors = read_checkpoint(checkpoint)  # its config and tensors checked
        config = MeteoraConfig(top_k=meta.top_k, temperature=meta.temperature, backend=check_backend(backend))
        if base_model is None:
            if not meta.base.uri:
                raise CheckpointError(f"checkpoint {checkpoint} records no base model URI: pass base_model=")
            base_model = meta.base.uri
        base, _ = _base(base_model, dtype)
        if not BaseFingerprint.of(base).matches(meta.base.fingerprint):
            raise CheckpointError(
                f"checkpoint {checkpoint} was trained on base model '{meta.base.name}' ({meta.base.fingerprint.structure}); "
                "the base model given is a different model"
            )
        stacks, gates = _stacks_from_checkpoint(checkpoint, base, expert_tensors, gate_tensors)
        return cls(base, stacks, meta.experts, config, meta.base, gates=gates, training=meta.training)

    def save_pretrained(self, path: str | Path) -> None:
        experts, gates = {}, {}
        for name, layer in self.layers.items():
            experts.update({f"{name}.{key}": t for key, t in layer.meteora_experts.stacked().items()})
            gates[f"{name}.gate"] = layer.meteora_gate
        meta = CheckpointMeta(self.base_info, self.experts, self.routing.top_k, self.routing.temperature,
                              sorted({name.rsplit(".", 1)[-1] for name in self.layers}), self.training_summary)
        write_checkpoint(path, meta, experts, gates)

    # ---- use --------------------------------------------------------------------------------------------
    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def device(self) -> torch.device:
        return self.base_model.device

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def configure(self, top_k: int | None = None, temperature: float | None = None, backend: str | None = None) -> None:
        """Change routing settings in place (e.g. a higher temperature for composite tasks)."""
        config = MeteoraConfig(
            top_k=self.routing.top_k if top_k is None else top_k,
            temperature=self.routing.temperature if temperature is None else temperature,
            backend=self.routing.backend if backend is None else backend,
        )
        config.check_experts(len(self.experts))
        self.routing.top_k, self.routing.temperature = config.top_k, config.temperature
        self.routing.backend = check_backend(config.backend)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def gate_parameters(self) -> list[nn.Parameter]:
        """The only trainable parameters: one gate [E, d_in] per adapted layer."""
        return [layer.meteora_gate for layer in self.layers.values()]

    def expert_ids(self, names: Sequence[str], param: str = "experts") -> list[int]:
        """The indices of a list of distinct, known expert names: UnknownExpert or InvalidRequest naming `param`
        otherwise (a single string too: it is not a list of names)."""
        if isinstance(names, str):
            raise InvalidRequest(f"{param} must be a list of expert names, got the string {names!r}", param, "invalid_experts")
        names = list(names)
        unknown = [n for n in names if n not in self.expert_names]
        if unknown:
            raise UnknownExpert(f"unknown experts {unknown}; experts: {self.expert_names}", param, "expert_not_found")
        if not names or len(set(names)) != len(names):
            raise InvalidRequest(f"experts {names} must name one or more distinct experts", param, "invalid_experts")
        return [self.expert_names.index(n) for n in names]

    @contextlib.contextmanager
    def configured(self, top_k: int | None = None, temperature: float | None = None, backend: str | None = None):
        """configure(...) inside the block only: the settings before it are back on exit."""
        before = (self.routing.top_k, self.routing.temperature, self.routing.backend)
        self.configure(top_k, temperature, backend)
        try:
            yield self
        finally:
            self.routing.top_k, self.routing.temperature, self.routing.backend = before

    @contextlib.contextmanager
    def force_experts(self, names: Sequence[str]):
        """Bypass the gates inside the block: every token uses `names` with equal weights."""
        ids = self.expert_ids(names)
        previous = self.routing.forced
        self.routing.forced = torch.tensor(ids)
        try:
            yield self
        finally:
            self.routing.forced = previous

    @contextlib.contextmanager
    def route_tokens(self, expert_ids: torch.Tensor):
        """Teacher routing, for analysis: inside the block a forward of inputs [B, S] sends token (b, s) to expert
        expert_ids[b, s] alone, at every adapted layer (perfect routing when the ids are the tokens' tasks);
        a token whose id is -1 is routed by the gates as usual."""
        in_range = expert_ids.numel() == 0 or -1 <= int(expert_ids.min()) <= int(expert_ids.max()) < len(self.expert_names)
        if expert_ids.dim() != 2 or not in_range:
            raise ValueError(f"route_tokens needs [B, S] expert ids in [-1, {len(self.expert_names)}) (-1: the gates), "
                             f"got shape {tuple(expert_ids.shape)}")
        self.routing.token_experts = expert_ids.reshape(-1).long()
        try:
            yield self
        finally:
            self.routing.token_experts = None

    @contextlib.contextmanager
    def capture_gate_logits(self):
        """Inside the block every routed layer appends its gate logits [T, E] to the yielded list (for the gate loss)."""
        self.routing.gate_logits = []
        try:
            yield self.routing.gate_logits
        finally:
            self.routing.gate_logits = None

    def recording_routing(self):
        """Inside the block every adapted layer records its routing; the yielded recorder's trace(batch) joins it."""
        return self.routing.recording(self.layer_names, self.expert_names)

    def generate(self, *args, return_routing: bool = False, **kwargs):
        """transformers' generate; with return_routing=True, a GenerationWithRouting (sequences + trace) of greedy
        or sampled decoding: beam search is refused, and so is any decoding whose trace misses a position."""
        if not return_routing:
            return self.base_model.generate(*args, **kwargs)
        beams = self._num_beams(args, kwargs)
        if beams > 1:
            raise ValueError(f"return_routing=True supports greedy and sampled decoding, not beam search (num_beams={beams})")
        with self.recording_routing() as recorder:
            out = self.base_model.generate(*args, **{**kwargs, "return_dict_in_generate": True})
        trace = recorder.trace(out.sequences.shape[0])
        if trace.ids.shape[1] != out.sequences.shape[1] - 1:
            raise ValueError(f"return_routing=True recorded {trace.ids.shape[1]} positions for sequences of "
                             f"{out.sequences.shape[1]} tokens: it supports plain decoding of input ids, one token a step")
        return GenerationWithRouting(sequences=out.sequences, routing=trace)

    def _num_beams(self, args: tuple, kwargs: dict) -> int:
        """The beam count generate will use, in transformers' order: num_beams=, else the generation_config given
        (keyword or second positional argument), else the model's own generation_config."""
        given = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
        candidates = (kwargs.get("num_beams"), getattr(given, "num_beams", None),
                      getattr(self.base_model.generation_config, "num_beams", None))
        return next((n for n in candidates if n is not None), 1)


def _registry_formats(adapters) -> dict[str, str]:
    """{name: prompt format} of a Registry's adapters; {} for other sources."""
    if not hasattr(adapters, "adapter_dirs"):
        return {}
    return {name: adapters.prompt_format([name]) for name in adapters.names}


def _load_adapters(adapters: AdapterSource) -> list[LoraAdapter]:
    if hasattr(adapters, "adapter_dirs"):  # a Registry: its adapters, cached locally and hash-checked
        adapters = adapters.adapter_dirs()
    items = list(adapters.items()) if isinstance(adapters, Mapping) else list(adapters)
    if not items:
        raise AdapterError("no adapters given: a MeteoRA model needs at least one expert")
    loaded = [item if isinstance(item, LoraAdapter) else load_adapter(item[1], name=item[0]) for item in items]
    names = [a.name for a in loaded]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise AdapterError(f"duplicate expert names: {duplicates}; each adapter needs its own name")
    return loaded


def _base(base: "PreTrainedModel | str | Path", dtype: torch.dtype | None) -> tuple["PreTrainedModel", str | None]:
    """The base model and the URI to record for it: absolute for a local path (others may load it from elsewhere)."""
    if isinstance(base, (str, Path)):
        return load_base_model(base, dtype), absolute_uri(base)
    if any(isinstance(m, MeteoraLinear) for m in base.modules()):
        raise ValueError("the base model already holds MeteoRA layers; pass a fresh base model")
    source = getattr(base, "name_or_path", "") or ""
    return base, (absolute_uri(source) if Path(source).is_dir() else None)


def _stacks_from_checkpoint(checkpoint, base, expert_tensors, gate_tensors):
    """Each gated layer's ExpertStack and gate, once its tensors fit the base model's Linear layer (read_checkpoint
    has checked how they fit each other)."""
    modules = dict(base.named_modules())
    absent = sorted(k.removesuffix(".gate") for k in gate_tensors if not isinstance(modules.get(k.removesuffix(".gate")), nn.Linear))
    if absent:
        raise CheckpointError(f"checkpoint {checkpoint}: layers {absent[:3]} are not Linear layers of the base model")
    stacks, gates = {}, {}
    for name in [n for n in modules if f"{n}.gate" in gate_tensors]:  # the base model's layer order
        linear = modules[name]
        A, B_t = expert_tensors[f"{name}.A"], expert_tensors[f"{name}.B_t"]
        ranks, scaling = expert_tensors[f"{name}.ranks"], expert_tensors[f"{name}.scaling"]
        if (A.shape[1], B_t.shape[1]) != (linear.in_features, linear.out_features):
            raise CheckpointError(f"checkpoint {checkpoint}: layer '{name}' maps {A.shape[1]} -> {B_t.shape[1]} features, "
                                  f"the base model's Linear {linear.in_features} -> {linear.out_features}")
        stacks[name] = ExpertStack.from_stacked(A.to(linear.weight.dtype), B_t.to(linear.weight.dtype), ranks, scaling)
        gates[name] = gate_tensors[f"{name}.gate"]
    return stacks, gates
