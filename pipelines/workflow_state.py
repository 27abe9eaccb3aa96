"""What the workflow remembers: each stage's outputs, recorded in <work_dir>/workflow_state.json when it succeeds,
and the digest of the inputs they were made from (a stage whose inputs hash the same is skipped)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from meteora_moe.store import atomic_write
from pipelines.config_files import ConfigError

STATE_FILE = "workflow_state.json"


@dataclass
class Collected:
    registry: str


@dataclass
class Trained:
    checkpoint: str
    experts: list[tuple[str, str]]  # (name, sha256) in expert order
    base: str  # the base model's structure fingerprint
    incremental: bool
    train_seconds: float
    eval_routing_accuracy: float | None
    settings: str = ""  # digest of the settings that change the gates (TrainGatesConfig.run_settings)
    init_from: str | None = None  # the checkpoint an incremental training started from


@dataclass
class Evaluated:
    out_dir: str
    mean_accuracy: dict[str, float]


@dataclass
class Deployed:
    checkpoint: str
    app: str


STAGE_OUTPUTS = {"collect": Collected, "train": Trained, "refine": Trained, "evaluate": Evaluated, "deploy": Deployed}


@dataclass
class StageResult:
    outputs: Collected | Trained | Evaluated | Deployed
    summary: str  # one line for the user
    inputs: str | None = None  # when running the stage changed its own inputs (collect commits the index): the new hash


class StageFailed(RuntimeError):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"stage '{stage}' failed: {type(error).__name__}: {error}")
        self.stage = stage


class State:
    """The last successful run of each stage: {stage: {inputs, outputs, finished}}, one JSON file, atomic writes."""

    def __init__(self, work_dir: Path):
        self.path = work_dir / STATE_FILE
        try:
            self.records = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except json.JSONDecodeError as err:
            raise ConfigError(f"{self.path}: not a workflow state file ({err}); move it away to run every stage again") from err

    def outputs(self, stage: str, inputs: str | None = None):
        """The stage's recorded outputs (only if they were made from `inputs`, when given), or None."""
        record = self.records.get(stage)
        if record is None or (inputs is not None and record["inputs"] != inputs):
            return None
        outputs = STAGE_OUTPUTS[stage](**record["outputs"])
        if isinstance(outputs, Trained):
            outputs.experts = [tuple(e) for e in outputs.experts]
        return outputs

    def record(self, stage: str, inputs: str, outputs) -> None:
        self.records[stage] = {"inputs": inputs, "outputs": dataclasses.asdict(outputs),
                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write(self.path, json.dumps(self.records, indent=2).encode())

    def forget(self, stage: str) -> None:
        self.records.pop(stage, None)


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
