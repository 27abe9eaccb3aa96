"""The adapter workflow as one Ray job: collect -> train the gates -> deploy -> evaluate.

    python pipelines/workflow.py --manifest M [--config configs/workflow.yaml] [key=value ...]   (train.steps=600 ...)
    ray job submit --address http://HEAD:PORT --working-dir . -- python pipelines/workflow.py --manifest M

stage     its inputs (hashed)                                 what it runs
collect   the manifest's bytes, its objects' tags, the        collect_adapters.collect (Ray tasks)
          registry and its index
train     the manifest's experts in order (weights, config,  train_gates.train (Ray Train) by train.method; incremental
          data, prompt format), the base model, the settings  when the last training, on the same base and settings,
          that change the gates                               had other experts but shares some with these (adapters
                                                              added, updated or removed): --init-from its checkpoint,
                                                              copied rows fixed (incremental_freeze_old); the fit
                                                              fits only the fresh rows, SGD trains incremental_steps
                                                              of the steps
deploy    the checkpoint's content, the serving settings      serve.run: a running application is updated in place (new
                                                              replicas start before old ones drain), or started
evaluate  the checkpoint's content, the evaluation settings   evaluate.evaluate_manifest in a Ray task on the driver's
                                                              node (work_dir is local to it): tables, plots (after
                                                              deploy: it reports on what serves, gates nothing)
A stage whose inputs hash as at its last success is skipped and says so; its record in
<work_dir>/workflow_state.json is written only when it succeeds, so a failed run resumes at the failed stage (a
failed training resumes its Ray Train run from the latest checkpoint). Deploy needs a cluster that outlives the
job (RAY_ADDRESS, or `ray job submit`): on a Ray started by the workflow itself it is skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).parents[1]))  # `python pipelines/workflow.py` from anywhere

import ray  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator  # noqa: E402

from meteora import RegistryError, StoreError  # noqa: E402
from meteora.model import checkpoint_digest, checkpoint_exists  # noqa: E402
from meteora.registry import Manifest, Registry, load_manifest, source_tags  # noqa: E402
from meteora.store import atomic_write  # noqa: E402
from pipelines.collect_adapters import collect, print_summary  # noqa: E402
from pipelines.common import ROOT, ConfigError, Uri, load_config, ray_connection, runtime_env, where_readable  # noqa: E402
from pipelines.evaluate import EvaluateSettings, evaluate_task  # noqa: E402
from pipelines.train_config import TrainGatesConfig  # noqa: E402
from pipelines.train_gates import print_training_summary, train  # noqa: E402

log = logging.getLogger("workflow")
DEFAULT_CONFIG = ROOT / "configs" / "workflow.yaml"
STATE_FILE = "workflow_state.json"
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


# ---- what each stage hands on (recorded in the state file) ---------------------------------------------------------
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


@dataclass
class Evaluated:
    out_dir: str
    mean_accuracy: dict[str, float]


@dataclass
class Deployed:
    checkpoint: str
    app: str


STAGE_OUTPUTS = {"collect": Collected, "train": Trained, "evaluate": Evaluated, "deploy": Deployed}


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


def run(manifest: Manifest, config: WorkflowConfig, can_deploy: bool) -> dict:
    """Every stage in order on the connected Ray; returns each stage's outputs. Raises StageFailed."""
    work = Path(config.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    state = State(work)
    outputs = {"collect": _stage(state, "collect", _collect_inputs(manifest, config), lambda: _collect(manifest, config))}
    registry = Registry(config.registry)
    experts = [(name, registry.entry(name)["sha256"]) for name in manifest.names]
    train_key = digest(experts, [registry.trained_on(name) for name in manifest.names],
                       registry.base_model["fingerprint"], config.train_config().run_settings())
    recorded = state.outputs("train", train_key)
    if recorded and not checkpoint_exists(recorded.checkpoint):
        state.forget("train")  # recorded, but its checkpoint is gone: train again
    previous = state.outputs("train")
    outputs["train"] = _stage(state, "train", train_key, lambda: _train(config, work, registry, experts, train_key, previous))
    checkpoint = outputs["train"].checkpoint
    content = checkpoint_digest(checkpoint)
    if config.deploy.enabled and can_deploy:  # before the evaluation: it reports on what serves, gates nothing
        if not _app_running(config.deploy.app_name):
            state.forget("deploy")  # recorded, but not running now (a restarted cluster): deploy again
        outputs["deploy"] = _stage(state, "deploy", digest(content, config.deploy.model_dump()),
                                   lambda: _deploy(checkpoint, config.deploy))
    elif config.deploy.enabled:
        print("[deploy] skipped: no long-running Ray cluster to deploy to (set RAY_ADDRESS or use `ray job submit`)")
    if config.evaluate.enabled:
        outputs["evaluate"] = _stage(state, "evaluate", digest(content, config.evaluate.model_dump(), manifest.digest),
                                     lambda: _evaluate(manifest, checkpoint, config, work))
    return outputs


def _stage(state: State, stage: str, inputs: str, action: Callable[[], StageResult]):
    previous = state.outputs(stage, inputs)
    if previous is not None:
        print(f"[{stage}] skipped: inputs unchanged since its last success ({state.records[stage]['finished']})", flush=True)
        return previous
    print(f"[{stage}] running", flush=True)
    started = time.perf_counter()
    try:
        result = action()
    except Exception as error:  # noqa: BLE001 - reported with the stage's name; the state keeps the last success
        raise StageFailed(stage, error) from error
    state.record(stage, result.inputs or inputs, result.outputs)
    print(f"[{stage}] done in {time.perf_counter() - started:.0f} s: {result.summary}", flush=True)
    return result.outputs


def _collect_inputs(manifest: Manifest, config: WorkflowConfig) -> str:
    """The manifest, the objects it names as they are now (replaced in place: collected again), the registry."""
    return digest(manifest.digest, source_tags(manifest), config.registry, Registry(config.registry).digest)


def _collect(manifest: Manifest, config: WorkflowConfig) -> StageResult:
    outcome = collect(manifest, config.registry)
    print_summary(outcome.rows)
    if not outcome.committed:
        raise RegistryError(f"the manifest {manifest.path} was not registered (see the table above); the registry is unchanged")
    added = sum(row["status"] in ("added", "new version") for row in outcome.rows)
    return StageResult(Collected(config.registry), f"{len(outcome.rows)} adapters, {added} new in {config.registry}",
                       inputs=_collect_inputs(manifest, config))  # the index as this commit left it


def _train(config: WorkflowConfig, work: Path, registry: Registry, experts: list[tuple[str, str]], key: str,
           previous: Trained | None) -> StageResult:
    settings = config.train_config()
    settings_digest = digest(settings.run_settings())
    artifacts = (config.artifacts or str(work)).rstrip("/")
    values = {"registry": registry.uri, "experts": [name for name, _ in experts], "storage_path": f"{artifacts}/runs"}
    if _can_start_from(previous, experts, registry, settings_digest):
        steps = max(1, math.ceil(config.incremental_steps * settings.training.steps))
        values.update(init_from=previous.checkpoint, steps=steps, freeze_old=config.incremental_freeze_old)
        added = [n for n, sha in experts if (n, sha) not in previous.experts]
        removed = [n for n, sha in previous.experts if (n, sha) not in experts]
        how = {"fit": "the fresh rows fitted", "sgd": f"{steps} steps", "fit+sgd": f"the fresh rows fitted, {steps} steps"}
        print(f"[train] incremental from {previous.checkpoint}, {how[settings.training.method]}: fresh gate rows for "
              f"{added or 'none'}, rows dropped for {removed or 'none'}"
              f"{', copied rows frozen' if config.incremental_freeze_old else ''}", flush=True)
    run_name = f"gates-{digest(key, values)[:12]}"  # a retry resumes its run; another warm start is another run
    values.update(name=run_name, output=f"{artifacts}/checkpoints/{run_name}")
    started = time.perf_counter()
    summary = train(config.train_config(**values))
    print_training_summary(summary, time.perf_counter() - started)
    outputs = Trained(summary["output"], experts, registry.base_model["fingerprint"], "init_from" in values,
                      summary["train_seconds"], (summary.get("final") or {}).get("eval_routing_accuracy"),
                      settings_digest)
    how = f"{summary['method']}, {summary['steps']} steps" if summary["steps"] else summary["method"]
    return StageResult(outputs, f"checkpoint {outputs.checkpoint} ({how}, {outputs.train_seconds} s of training)")


def _can_start_from(previous: Trained | None, experts: list[tuple[str, str]], registry: Registry, settings: str) -> bool:
    """An earlier training on the same base and settings whose experts differ from these (adapters added, updated
    or removed) but share some (same name and weights). Other settings, or the same experts, train in full."""
    return (previous is not None and previous.base == registry.base_model["fingerprint"] and previous.settings == settings
            and checkpoint_exists(previous.checkpoint) and set(previous.experts) != set(experts)
            and bool(set(previous.experts) & set(experts)))


def _evaluate(manifest: Manifest, checkpoint: str, config: WorkflowConfig, work: Path) -> StageResult:
    out_dir = work / "eval" / checkpoint.rstrip("/").rsplit("/", 1)[-1]
    task = evaluate_task.options(runtime_env=runtime_env(), **where_readable(str(out_dir)))  # out_dir: this node's
    for streamed in task.remote(manifest, checkpoint, config.evaluate, str(out_dir)):  # progress lines, then the tables
        item = ray.get(streamed)
        if isinstance(item, str):
            print(f"[evaluate] {item}", flush=True)
    results = item
    means = {variant: round(sum(scores.values()) / len(scores), 3) for variant, scores in results["per_task"].items()}
    return StageResult(Evaluated(str(out_dir), means), f"mean accuracy {means}; tables and plots in {out_dir}")


def _app_running(app_name: str) -> bool:
    from ray import serve

    try:
        return serve.status().applications[app_name].status == "RUNNING"
    except Exception:  # noqa: BLE001 - no Serve on this cluster, or no such application
        return False


def _deploy(checkpoint: str, settings: DeploySettings) -> StageResult:
    from ray import serve

    import serve_app

    serve.start(http_options={"host": settings.host, "port": settings.http_port},  # a running Serve keeps its own
                proxy_location=settings.proxy_location)
    args = serve_app.ServeSettings.model_validate({**settings.settings, "checkpoint": checkpoint}).model_dump()
    updating = _app_running(settings.app_name)
    serve.run(serve_app.MeteoraServer.options(**settings.deployment).bind(args), name=settings.app_name,
              route_prefix=settings.route_prefix)
    verb = "updated in place" if updating else "started"
    return StageResult(Deployed(checkpoint, settings.app_name), f"application '{settings.app_name}' {verb} with {checkpoint}")


def load_workflow_config(path: str | Path | None, overrides: list[str]) -> WorkflowConfig:
    """configs/workflow.yaml (or `path`) with dotted key=value overrides."""
    return load_config(WorkflowConfig, path or DEFAULT_CONFIG, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="the adapter manifest (local path or s3://)")
    parser.add_argument("--config", default=None, help="YAML config (default configs/workflow.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value settings over the config file (dotted: train.steps=600)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_workflow_config(args.config, args.overrides)
        manifest = load_manifest(args.manifest)  # a bad manifest fails before Ray starts
        with ray_connection() as started_here:
            outputs = run(manifest, config, can_deploy=not started_here)
    except (ValueError, StoreError) as err:  # meteora's and the config's user errors, each naming what is wrong
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StageFailed as err:
        if not isinstance(err.__cause__, (ValueError, OSError)):  # not a user error: a bug, shown with its traceback
            traceback.print_exception(err.__cause__)
        print(f"error: {err}\n(the stages before it are recorded; run again to resume at '{err.stage}')", file=sys.stderr)
        return 1
    summary = {stage: {k: v for k, v in dataclasses.asdict(out).items() if k != "experts"} for stage, out in outputs.items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
