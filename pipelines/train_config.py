"""The gate-training job's configuration: configs/train_gates.yaml, overridden by key=value arguments.

Every key is validated (type, range, unknown keys refused) before anything starts, and errors name the key.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CONFIG = Path(__file__).parents[1] / "configs" / "train_gates.yaml"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """The job's configuration is wrong: the message names the key or file."""


class TrainGatesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    registry: str | None = None  # registry URI (local or s3://); None: the embedded tinytasks registry
    experts: list[str] | None = None  # registry adapters to fuse, in expert order; None: all of them
    output: str | None = None  # MeteoRA checkpoint URI; None: <storage_path>/<name>/meteora
    init_from: str | None = None  # a MeteoRA checkpoint whose gate rows start the experts it shares
    freeze_old: bool = False  # with init_from: train only the new experts' gate rows
    new_fraction: float | None = Field(None, ge=0.0, le=1.0)  # with init_from: share of each batch from new experts;
    #                                                              None: their share of all experts (every expert equally)

    name: str = "meteora-gates"  # run name: a run with the same name and storage_path resumes
    storage_path: str | None = None  # Ray Train checkpoints: local dir or s3://; None: <cache>/ray_results
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(3, ge=0)  # worker-group restarts from the latest checkpoint before giving up

    top_k: int = Field(2, ge=1)
    temperature: float = Field(1.0, gt=0)
    steps: int = Field(300, ge=1)
    batch: int = Field(32, ge=1)  # samples per step over all workers
    lr: float = Field(5e-3, gt=0)  # Adam on the gates; cosine decay to lr / 10 after a 5% warm-up
    gate_weight: float = Field(50.0, ge=0)  # lambda in CE_LM + lambda * CE_gate
    exclude_prompt: bool = True  # CE_LM on response tokens only
    composite_fraction: float = Field(0.0, ge=0.0, le=1.0)  # share of items that are composites (labelled per segment)
    composite_max: int = Field(5, ge=2)  # problems in a composite: 2..composite_max
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 base weights on GPU, fp32 on CPU
    checkpoint_every: int = Field(50, ge=1)  # steps between checkpoints, metrics and progress lines
    keep_checkpoints: int = Field(2, ge=1)
    eval_samples: int = Field(256, ge=0)  # eval-split samples for the routing accuracy at each checkpoint
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> "TrainGatesConfig":
        if self.batch % self.num_workers:
            raise ValueError(f"batch ({self.batch}) must be a multiple of num_workers ({self.num_workers})")
        if not RUN_NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must be 1-64 letters, digits, '_', '.' or '-' (it becomes a path)")
        if self.freeze_old and not self.init_from:
            raise ValueError("freeze_old needs init_from (there are no old gate rows to freeze)")
        return self

    def run_fingerprint(self, experts: list[dict]) -> str:
        """What a resumed run must share with the run it resumes: the experts, the warm start and the seed."""
        key = {"experts": [(e["name"], e["sha256"]) for e in experts], "init_from": self.init_from, "seed": self.seed}
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def load_config(path: str | Path | None, overrides: list[str]) -> TrainGatesConfig:
    """The YAML file (default configs/train_gates.yaml) with `key=value` overrides (values parsed as YAML)."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {item!r} is not key=value")
        try:
            values[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"argument {item!r}: the value is not valid YAML: {err}") from None
    try:
        return TrainGatesConfig(**values)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid training config ({path} + arguments): {problems}") from None
