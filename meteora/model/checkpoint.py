"""The MeteoRA checkpoint directory: what is stored, and reading/writing it safely.

    meteora_config.json   format_version, base_model {name, uri, fingerprint, probe}, experts [{name, sha256,
                          rank, alpha, scaling, target_modules, source, prompt_format}], target_modules, top_k,
                          temperature, training (the summary of the run that trained the gates), files {the
                          two tensor files' sha256}
    experts.safetensors   "<layer>.A" [R, d_in], "<layer>.B_t" [R, d_out] (scaling_e * B_e^T), "<layer>.ranks" [E],
                          "<layer>.scaling" [E]; experts' rows in expert order at their own ranks, no padding
    gates.safetensors     "<layer>.gate" [E, d_in]
The base model is referenced by URI and fingerprint, never copied. Each file is written to a temporary name
and renamed into place, the config last; the config records the sha256 of the two tensor files, so a reader
that meets files of two different saves refuses them instead of pairing them. A checkpoint may live in any
store (a local path, file:// or s3://): it is written locally and uploaded, config last, or downloaded to read.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import AdapterError, CheckpointError, StoreError
from ..store import atomic_write, file_sha256, is_remote, local_dir, open_store
from .adapters import ExpertInfo
from .config import check_expert_name
from .fingerprint import BaseInfo

FORMAT_VERSION = 1
CONFIG_FILE = "meteora_config.json"
EXPERTS_FILE = "experts.safetensors"
GATES_FILE = "gates.safetensors"
REQUIRED = {"base_model": dict, "experts": list, "top_k": int, "temperature": (int, float)}
REQUIRED_BASE = ("name", "uri", "fingerprint", "probe")
REQUIRED_EXPERT = ("name", "sha256", "rank", "alpha", "scaling", "target_modules")
LAYER_TENSORS = ("A", "B_t", "ranks", "scaling")  # experts.safetensors holds "<layer>.<each>" for every gated layer
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass
class CheckpointMeta:
    """meteora_config.json, typed."""

    base: BaseInfo
    experts: list[ExpertInfo]
    top_k: int
    temperature: float
    target_modules: list[str] = field(default_factory=list)  # module names adapted somewhere (q_proj, ...)
    training: dict = field(default_factory=dict)  # the training summary: a free-form record for people and tools

    def to_json(self) -> dict:
        return {"base_model": self.base.to_json(), "experts": [e.to_json() for e in self.experts],
                "target_modules": self.target_modules, "top_k": self.top_k, "temperature": self.temperature,
                "training": self.training}


def write_checkpoint(path: str | Path, meta: CheckpointMeta, experts: dict[str, torch.Tensor],
                     gates: dict[str, torch.Tensor]) -> None:
    if is_remote(path):
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(tmp, meta, experts, gates)
            store = open_store(path)
            for name in (EXPERTS_FILE, GATES_FILE, CONFIG_FILE):  # the config last: it marks a complete checkpoint
                store.write_bytes(name, (Path(tmp) / name).read_bytes())
        return
    path = local_dir(path)
    atomic_write(path / EXPERTS_FILE, lambda tmp: save_file(_contiguous(experts), tmp, metadata={"format": "pt"}))
    atomic_write(path / GATES_FILE, lambda tmp: save_file(_contiguous(gates), tmp, metadata={"format": "pt"}))
    files = {name: file_sha256(path / name) for name in (EXPERTS_FILE, GATES_FILE)}  # ties the three files together
    text = json.dumps({"format_version": FORMAT_VERSION, **meta.to_json(), "files": files}, indent=2)
    atomic_write(path / CONFIG_FILE, text.encode())


def read_checkpoint(path: str | Path) -> tuple[CheckpointMeta, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, expert tensors, gate tensors), checked against each other (not yet against a base model).
    Raises CheckpointError naming the file (under the URI given) and the field or tensor that is wrong."""
    if is_remote(path):
        return _read_downloaded(path, (CONFIG_FILE, EXPERTS_FILE, GATES_FILE), read_checkpoint)
    path = local_dir(path)
    raw = _read_config(path)
    for name, digest in (raw.get("files") or {}).items():
        if name in (EXPERTS_FILE, GATES_FILE) and (path / name).is_file() and file_sha256(path / name) != digest:
            raise CheckpointError(f"{path / name} does not match the sha256 in {CONFIG_FILE}: "
                                  "the files come from different saves (or were changed)")
    meta, experts, gates = _meta(raw, path / CONFIG_FILE), _load(path / EXPERTS_FILE), _load(path / GATES_FILE)
    for layer in [key.removesuffix(".gate") for key in gates if key.endswith(".gate")]:
        _check_layer(path, layer, experts, gates[f"{layer}.gate"], [e.name for e in meta.experts])
    return meta, experts, gates


def read_checkpoint_config(path: str | Path) -> CheckpointMeta:
    """The checkpoint's config alone, checked (from a remote checkpoint only the config is downloaded)."""
    if is_remote(path):
        return _read_downloaded(path, (CONFIG_FILE,), read_checkpoint_config)
    path = local_dir(path)
    return _meta(_read_config(path), path / CONFIG_FILE)


def checkpoint_exists(path: str | Path) -> bool:
    """Whether a complete checkpoint is at `path` (its config is written last)."""
    return open_store(path).exists(CONFIG_FILE)


def checkpoint_digest(path: str | Path) -> str:
    """A hash of what a checkpoint serves: its config and its gates (the experts are tied to the config)."""
    store = open_store(path)
    return hashlib.sha256(b"".join(hashlib.sha256(store.read_bytes(name)).digest() for name in (CONFIG_FILE, GATES_FILE))).hexdigest()


def _read_config(path: Path) -> dict:
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a MeteoRA checkpoint: {CONFIG_FILE} is missing")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_file}: format_version {config.get('format_version')!r} is not {FORMAT_VERSION}")
    return config


def _meta(config: dict, config_file: Path) -> CheckpointMeta:
    for name, kind in REQUIRED.items():
        if not isinstance(config.get(name), kind):
            raise CheckpointError(f"{config_file}: field '{name}' is missing or not a {getattr(kind, '__name__', 'number')}")
    missing = [name for name in REQUIRED_BASE if name not in config["base_model"]]
    if missing:
        raise CheckpointError(f"{config_file}: base_model lacks {missing}")
    _check_experts(config["experts"], config_file)
    _check_routing(config["top_k"], config["temperature"], len(config["experts"]), config_file)
    return CheckpointMeta(base=BaseInfo.from_json(config["base_model"]),
                          experts=[ExpertInfo.from_json(e) for e in config["experts"]], top_k=config["top_k"],
                          temperature=float(config["temperature"]), target_modules=config.get("target_modules", []),
                          training=config.get("training") or {})


def _check_experts(experts: list, config_file: Path) -> None:
    """One or more experts, each with the required fields and a valid name of its own."""
    if not experts:
        raise CheckpointError(f"{config_file}: field 'experts' is empty")
    for index, expert in enumerate(experts):
        if not isinstance(expert, dict) or any(name not in expert for name in REQUIRED_EXPERT):
            raise CheckpointError(f"{config_file}: experts[{index}] needs the fields {list(REQUIRED_EXPERT)}")
        try:
            check_expert_name(expert["name"])
        except AdapterError as err:
            raise CheckpointError(f"{config_file}: experts[{index}].name: {err}") from None
    names = [expert["name"] for expert in experts]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise CheckpointError(f"{config_file}: field 'experts' names {duplicates} more than once")


def _check_routing(top_k, temperature, n_experts: int, config_file: Path) -> None:
    if isinstance(top_k, bool) or not 1 <= top_k <= n_experts:
        raise CheckpointError(f"{config_file}: field 'top_k' must be an integer from 1 to the number of experts "
                              f"({n_experts}), got {top_k!r}")
    if isinstance(temperature, bool) or not temperature > 0:
        raise CheckpointError(f"{config_file}: field 'temperature' must be a number > 0, got {temperature!r}")


def _check_layer(path: Path, layer: str, experts: dict[str, torch.Tensor], gate: torch.Tensor, names: list[str]) -> None:
    """The tensors of one gated layer fit each other and the experts (their fit to the base model is checked on load)."""
    missing = [f"{layer}.{key}" for key in LAYER_TENSORS if f"{layer}.{key}" not in experts]
    if missing:
        raise CheckpointError(f"{path / EXPERTS_FILE} lacks tensors {missing} of layer '{layer}'")
    A, B_t, ranks, scaling = (experts[f"{layer}.{key}"] for key in LAYER_TENSORS)
    for file, key, matrix in ((EXPERTS_FILE, "A", A), (EXPERTS_FILE, "B_t", B_t), (GATES_FILE, "gate", gate)):
        if matrix.dim() != 2 or not matrix.is_floating_point():
            raise CheckpointError(f"{path / file}: tensor '{layer}.{key}' must be a 2-D float matrix, "
                                  f"got {matrix.dtype} {list(matrix.shape)}")
    if ranks.shape != (len(names),) or ranks.dtype not in INTEGER_DTYPES:
        raise CheckpointError(f"{path / EXPERTS_FILE}: tensor '{layer}.ranks' must hold {len(names)} integers "
                              f"(one per expert), got {ranks.dtype} {list(ranks.shape)}")
    negative = [name for name, rank in zip(names, ranks.tolist()) if rank < 0]
    if negative:
        raise CheckpointError(f"{path / EXPERTS_FILE}: tensor '{layer}.ranks' gives experts {negative} a negative rank")
    if scaling.shape != (len(names),) or not scaling.is_floating_point():
        raise CheckpointError(f"{path / EXPERTS_FILE}: tensor '{layer}.scaling' must hold {len(names)} floats "
                              f"(one per expert), got {scaling.dtype} {list(scaling.shape)}")
    rows = int(ranks.sum())
    if A.shape[0] != rows or B_t.shape[0] != rows:
        raise CheckpointError(f"{path / EXPERTS_FILE}: '{layer}.A' has {A.shape[0]} rows and '{layer}.B_t' "
                              f"{B_t.shape[0]}, but the experts' ranks in '{layer}.ranks' add up to {rows}")
    if gate.shape != (len(names), A.shape[1]):
        raise CheckpointError(f"{path / GATES_FILE}: tensor '{layer}.gate' has shape {list(gate.shape)}, not "
                              f"[{len(names)}, {A.shape[1]}] (the experts, the input size of '{layer}.A')")


def _read_downloaded(uri: str, names: tuple[str, ...], read):
    """read() of a temporary copy of the checkpoint's files `names`, its errors naming `uri` instead of the copy."""
    with tempfile.TemporaryDirectory() as tmp:
        _download(uri, Path(tmp), names)
        try:
            return read(tmp)
        except CheckpointError as err:
            raise CheckpointError(str(err).replace(tmp, str(uri).rstrip("/"))) from None


def _download(uri: str, target: Path, names: tuple[str, ...]) -> None:
    store = open_store(uri)
    try:
        if not store.exists(CONFIG_FILE):
            raise CheckpointError(f"{uri} is not a MeteoRA checkpoint: {CONFIG_FILE} is missing")
        for name in names:
            if store.exists(name):
                store.download(name, target / name)
    except StoreError as err:
        raise CheckpointError(f"cannot read checkpoint {uri}: {err}") from None


def _load(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing")
    try:
        return load_file(file)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint file {file} is unreadable (truncated or corrupt): {err}") from None


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
