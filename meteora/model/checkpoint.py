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
store (a local path or s3://): it is written locally and uploaded, config last, or downloaded to read.
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

from ..errors import CheckpointError, StoreError
from ..store import atomic_write, is_remote, open_store
from .adapters import ExpertInfo
from .fingerprint import BaseInfo

FORMAT_VERSION = 1
CONFIG_FILE = "meteora_config.json"
EXPERTS_FILE = "experts.safetensors"
GATES_FILE = "gates.safetensors"
REQUIRED = {"base_model": dict, "experts": list, "top_k": int, "temperature": (int, float)}
REQUIRED_BASE = ("name", "uri", "fingerprint", "probe")
REQUIRED_EXPERT = ("name", "sha256", "rank", "alpha", "scaling", "target_modules")


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
    path = Path(path)
    atomic_write(path / EXPERTS_FILE, lambda tmp: save_file(_contiguous(experts), tmp, metadata={"format": "pt"}))
    atomic_write(path / GATES_FILE, lambda tmp: save_file(_contiguous(gates), tmp, metadata={"format": "pt"}))
    files = {name: _sha256(path / name) for name in (EXPERTS_FILE, GATES_FILE)}  # ties the three files together
    text = json.dumps({"format_version": FORMAT_VERSION, **meta.to_json(), "files": files}, indent=2)
    atomic_write(path / CONFIG_FILE, text.encode())


def read_checkpoint(path: str | Path) -> tuple[CheckpointMeta, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, expert tensors, gate tensors). Raises CheckpointError naming the file that is wrong."""
    if is_remote(path):
        with tempfile.TemporaryDirectory() as tmp:
            _download(path, Path(tmp), (CONFIG_FILE, EXPERTS_FILE, GATES_FILE))
            return read_checkpoint(tmp)
    path = Path(path)
    raw = _read_config(path)
    for name, digest in (raw.get("files") or {}).items():
        if name in (EXPERTS_FILE, GATES_FILE) and (path / name).is_file() and _sha256(path / name) != digest:
            raise CheckpointError(f"{path / name} does not match the sha256 in {CONFIG_FILE}: "
                                  "the files come from different saves (or were changed)")
    return _meta(raw, path / CONFIG_FILE), _load(path / EXPERTS_FILE), _load(path / GATES_FILE)


def read_checkpoint_config(path: str | Path) -> CheckpointMeta:
    """The checkpoint's config alone, checked (from a remote checkpoint only the config is downloaded)."""
    if is_remote(path):
        with tempfile.TemporaryDirectory() as tmp:
            _download(path, Path(tmp), (CONFIG_FILE,))
            return read_checkpoint_config(tmp)
    return _meta(_read_config(Path(path)), Path(path) / CONFIG_FILE)


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
    for index, expert in enumerate(config["experts"]):
        if not isinstance(expert, dict) or any(name not in expert for name in REQUIRED_EXPERT):
            raise CheckpointError(f"{config_file}: experts[{index}] needs the fields {list(REQUIRED_EXPERT)}")
    return CheckpointMeta(base=BaseInfo.from_json(config["base_model"]),
                          experts=[ExpertInfo.from_json(e) for e in config["experts"]], top_k=config["top_k"],
                          temperature=float(config["temperature"]), target_modules=config.get("target_modules", []),
                          training=config.get("training") or {})


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


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
