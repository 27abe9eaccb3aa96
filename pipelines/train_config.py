"""The gate-training job's configuration: configs/train_gates.yaml, overridden by key=value arguments.

One flat file: the method's settings are meteora_moe.training.GateTrainingConfig's fields (steps, batch, lr, ...),
gathered into `training`; the rest say what to train and where it runs. Every key is validated (type, range,
unknown keys refused) before anything starts, and errors name the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from meteora_moe.model import Precision
from meteora_moe.training import GateTrainingConfig

from .config_files import ROOT, Uri, load_config

DEFAULT_CONFIG = ROOT / "configs" / "train_gates.yaml"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TRAINING_KEYS = {f.name for f in dataclasses.fields(GateTrainingConfig)}
LOOP_KEYS = {"steps", "batch", "lr", "gate_weight", "exclude_prompt", "new_fraction"}  # read by the SGD loop only
FIT_KEYS = {key for key in TRAINING_KEYS if key.startswith("fit_")}  # read by the fit only


class TrainGatesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    registry: Uri | None = None  # registry URI (local or s3://); None: the embedded tinytasks registry
    experts: list[str] | None = None  # registry adapters to fuse, in expert order; None: all of them
    output: Uri | None = None  # MeteoRA checkpoint URI; None: <storage_path>/<name>/meteora
    init_from: Uri | None = None  # a MeteoRA checkpoint whose gate rows start the experts and modules it shares

    name: str = "meteora-gates"  # run name: a run with the same name and storage_path resumes
    storage_path: Uri | None = None  # Ray Train checkpoints: local dir or s3://; None: <cache>/ray_results
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    placement: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # Ray's placement of the workers over nodes
    max_failures: int = Field(3, ge=0)  # worker-group restarts from the latest checkpoint before giving up
    keep_checkpoints: int = Field(2, ge=1)
    precision: Precision = "auto"  # the base weights: auto = bf16 on GPU, fp32 on CPU; fast = bf16 where faster

    training: GateTrainingConfig = GateTrainingConfig()  # the flat keys steps=, batch=, lr=, ... land here

    @model_validator(mode="before")
    @classmethod
    def _gather_training_keys(cls, values):
        if isinstance(values, dict):
            if "training" in values:
                raise ValueError("training: set its keys flat (steps=, lr=, ...), as configs/train_gates.yaml does")
            training = {k: v for k, v in values.items() if k in TRAINING_KEYS}
            values = {**{k: v for k, v in values.items() if k not in TRAINING_KEYS}, "training": training}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> "TrainGatesConfig":
        if self.training.batch % self.num_workers:
            raise ValueError(f"batch ({self.training.batch}) must be a multiple of num_workers ({self.num_workers})")
        if not RUN_NAME.fullmatch(self.name):
            raise ValueError(f"name {self.name!r} must be 1-64 letters, digits, '_', '.' or '-' (it becomes a path)")
        if self.training.freeze_old and not self.init_from:
            raise ValueError("freeze_old needs init_from (there are no old gate rows to freeze)")
        return self

    def flat(self) -> dict:
        """The config as the flat keys of configs/train_gates.yaml (what Ray hands the workers)."""
        values = self.model_dump(exclude={"training"})
        return {**values, **dataclasses.asdict(self.training)}

    def run_settings(self) -> dict:
        """The settings that change the gates a run trains: all of `training` but what only watches it
        (checkpoint_every, eval_samples) and what the method does not read (the loop's keys for a fit, the fit's for
        the loop), and the precision (with use_gpu, which "auto" resolves by). A resumed run must share them,
        whatever its workers."""
        unread = {"fit": LOOP_KEYS, "sgd": FIT_KEYS, "fit+sgd": set()}[self.training.method]
        ignored = {"checkpoint_every", "eval_samples", *unread}
        precision = {"precision": self.precision, **({"use_gpu": self.use_gpu} if self.precision == "auto" else {})}
        return {**{k: v for k, v in dataclasses.asdict(self.training).items() if k not in ignored}, **precision}

    def run_fingerprint(self, experts: list[tuple]) -> str:
        """What a resumed run must share with the run it resumes: the experts (name, sha256, what the gates learn
        from it: Registry.trained_on), the warm start, the settings."""
        key = {"experts": experts, "init_from": self.init_from, "settings": self.run_settings()}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_train_config(path: str | Path | None, overrides: list[str]) -> TrainGatesConfig:
    """configs/train_gates.yaml (or `path`) with key=value overrides."""
    return load_config(TrainGatesConfig, path or DEFAULT_CONFIG, overrides)
