"""The workflow's configuration (configs/workflow.yaml): where things go, and each stage's settings, all checked when
the file loads (the serving settings by the application's own schema), not when a stage starts."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.config_files import ROOT, Uri, load_config
from pipelines.evaluate import EvaluateSettings
from pipelines.train_config import TrainGatesConfig

DEFAULT_CONFIG = ROOT / "configs" / "workflow.yaml"
SET_BY_WORKFLOW = {"registry", "experts", "output", "init_from", "freeze_old", "name", "storage_path"}


class DeploySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    app_name: str = "meteora"
    route_prefix: str = "/"
    host: str = "127.0.0.1"  # Serve's HTTP proxy, when this job starts Serve
    http_port: int = Field(8000, ge=1, le=65535)
    proxy_location: Literal["HeadOnly", "EveryNode"] = "HeadOnly"  # one endpoint, on the head (the job's node)
    settings: dict = {}  # serve_app.ServeSettings besides checkpoint
    deployment: dict = {"ray_actor_options": {"num_cpus": 0.5}, "num_replicas": 1, "max_surge_percent": 100}

    @model_validator(mode="after")
    def _serve_settings(self) -> "DeploySettings":
        import serve_app  # the application's and Ray Serve's own checks, when the config loads, not after training

        try:
            serve_app.ServeSettings.model_validate({**self.settings, "checkpoint": "set by the workflow"})
        except ValidationError as err:
            raise ValueError("; ".join(f"settings.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())) from None
        try:
            serve_app.MeteoraServer.options(**self.deployment)
        except (TypeError, ValueError) as err:  # an unknown option; a bad value (pydantic's errors are ValueErrors)
            raise ValueError(f"deployment: {err}") from None
        return self


class WorkflowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    registry: Uri  # where the manifest's adapters are registered (local dir or s3://)
    work_dir: str  # local: the state file and the evaluations
    artifacts: Uri | None = None  # Ray Train runs and checkpoints (s3:// on a multi-node cluster); None: work_dir
    train: dict = {}  # pipelines/train_gates settings (configs/train_gates.yaml keys) but the ones the workflow sets
    incremental_steps: float = Field(0.25, gt=0, le=1)  # share of train.steps when training starts from the last one
    incremental_freeze_old: bool = True  # then: the copied gate rows stay fixed, only fresh rows and new gates train
    refine_steps: int = Field(0, ge=0)  # train.method fit: after the fit is deployed, the loop from it, redeployed
    evaluate: EvaluateSettings = EvaluateSettings()
    deploy: DeploySettings = DeploySettings()

    @model_validator(mode="after")
    def _train_settings(self) -> "WorkflowConfig":
        unexpected = sorted(SET_BY_WORKFLOW & set(self.train))
        if unexpected:
            raise ValueError(f"train: {unexpected} are set by the workflow itself")
        self.train_config()  # the training settings are checked now, not when the train stage starts
        return self

    def train_config(self, **values) -> TrainGatesConfig:
        return TrainGatesConfig(**{**self.train, **values})


def load_workflow_config(path: str | Path | None, overrides: list[str]) -> WorkflowConfig:
    """configs/workflow.yaml (or `path`) with dotted key=value overrides."""
    return load_config(WorkflowConfig, path or DEFAULT_CONFIG, overrides)
