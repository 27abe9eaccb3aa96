"""The adapter workflow as one Ray job: collect -> train the gates -> evaluate -> deploy.

    python pipelines/workflow.py --manifest M [--config configs/workflow.yaml] [key=value ...]   (train.steps=600 ...)
    ray job submit --address http://HEAD:PORT --working-dir . -- python pipelines/workflow.py --manifest M

stage     its inputs (hashed)                                 what it runs
collect   the manifest's bytes, the registry and its index    pipelines/collect_adapters.collect (Ray tasks)
train     the manifest's experts (name, sha256) in order,     pipelines/train_gates.train (Ray Train); incremental when
          the base model, the training settings               the experts only grew since the last training: --init-from
                                                              its checkpoint (old rows start trained), incremental_steps of the steps
evaluate  the checkpoint's content, the evaluation settings   meteora.harness.evaluate in a Ray task: tables and plots
deploy    the checkpoint's content, the serving settings      serve.run: a running application is updated in place (new
                                                              replicas start before old ones drain), or started
A stage whose inputs hash as at its last success is skipped and says so; its record in
<work_dir>/workflow_state.json is written only when it succeeds, so a failed run resumes at the failed stage (a
failed training resumes its Ray Train run from the latest checkpoint). Deploy needs a cluster that outlives the
job (RAY_ADDRESS, or `ray job submit`): on a Ray started by the workflow itself it is skipped.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # `python pipelines/workflow.py` from anywhere

import ray  # noqa: E402
import yaml  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, ValidationError  # noqa: E402

from meteora import Registry, RegistryError  # noqa: E402
from meteora.manifest import ManifestError, load_manifest  # noqa: E402
from meteora.store import StoreError, open_store, split_uri  # noqa: E402
from pipelines.collect_adapters import collect, print_summary  # noqa: E402
from pipelines.train_config import ConfigError, TrainGatesConfig  # noqa: E402
from pipelines.train_gates import print_training_summary, ray_connection, train, worker_env  # noqa: E402

log = logging.getLogger("workflow")
DEFAULT_CONFIG = Path(__file__).parents[1] / "configs" / "workflow.yaml"
STATE_FILE = "workflow_state.json"
SET_BY_WORKFLOW = {"registry", "experts", "output", "init_from", "freeze_old", "name", "storage_path"}


class EvaluateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    composite: list[int] = [3, 5]  # composite-n sizes
    composite_count: int = Field(40, ge=1)
    samples: int | None = Field(None, ge=1)  # eval samples per task; None = all


class DeploySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    app_name: str = "meteora"
    route_prefix: str = "/"
    host: str = "127.0.0.1"  # Serve's HTTP proxy, when this job starts Serve
    http_port: int = Field(8000, ge=1, le=65535)
    settings: dict = {}  # serve_app.ServeSettings besides checkpoint
    deployment: dict = {"ray_actor_options": {"num_cpus": 0.5}, "num_replicas": 1, "max_surge_percent": 100}


class WorkflowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    registry: str  # where the manifest's adapters are registered (local dir or s3://)
    work_dir: str  # local: the state file and the evaluations
    artifacts: str | None = None  # Ray Train runs and checkpoints (s3:// on a multi-node cluster); None: work_dir
    train: dict = {}  # pipelines/train_gates settings (configs/train_gates.yaml keys) but the ones the workflow sets
    incremental_steps: float = Field(0.3, gt=0, le=1)  # share of train.steps when only adapters were added
    evaluate: EvaluateSettings = EvaluateSettings()
    deploy: DeploySettings = DeploySettings()

    def train_config(self, **values) -> TrainGatesConfig:
        return TrainGatesConfig(**{**self.train, **values})


class StageFailed(RuntimeError):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"stage '{stage}' failed: {type(error).__name__}: {error}")
        self.stage = stage


class State:
    """The last successful run of each stage: {stage: {inputs, outputs, finished}}, one JSON file, atomic writes."""

    def __init__(self, work_dir: Path):
        self.path = work_dir / STATE_FILE
        self.records = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def unchanged(self, stage: str, inputs: str) -> dict | None:
        record = self.records.get(stage)
        return record["outputs"] if record and record["inputs"] == inputs else None

    def record(self, stage: str, inputs: str, outputs: dict) -> None:
        self.records[stage] = {"inputs": inputs, "outputs": outputs, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.records, indent=2))
        temporary.replace(self.path)


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def run(manifest_uri: str, config: WorkflowConfig, can_deploy: bool) -> dict:
    """Every stage in order on the connected Ray; returns each stage's outputs. Raises StageFailed."""
    work = Path(config.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    state = State(work)
    manifest_bytes = _read(manifest_uri)
    manifest = load_manifest(manifest_uri)
    experts = [spec.name for spec in manifest.adapters]
    outputs = {"collect": _stage(state, "collect", _collect_inputs(manifest_bytes, config),
                                 lambda: _collect(manifest_uri, config))}
    registry = Registry(config.registry)
    expert_entries = [(name, registry.entry(name)["sha256"]) for name in experts]
    train_key = digest(expert_entries, registry.base_model["fingerprint"], config.train, config.incremental_steps)
    recorded = state.unchanged("train", train_key)
    if recorded and not open_store(recorded["checkpoint"]).exists("meteora_config.json"):
        state.records.pop("train")  # recorded, but its checkpoint is gone: train again
    outputs["train"] = _stage(state, "train", train_key, lambda: _train(config, work, registry, experts, expert_entries,
                                                                       train_key, state.records.get("train")))
    checkpoint = outputs["train"]["checkpoint"]
    content = _checkpoint_digest(checkpoint)
    if config.evaluate.enabled:
        outputs["evaluate"] = _stage(state, "evaluate", digest(content, config.evaluate.model_dump(), hashlib.sha256(manifest_bytes).hexdigest()),
                                     lambda: _evaluate(manifest_uri, checkpoint, config, work))
    if config.deploy.enabled and can_deploy:
        deploy_key = digest(content, config.deploy.model_dump())
        if not _app_running(config.deploy.app_name):
            state.records.pop("deploy", None)  # recorded, but not running now (a restarted cluster): deploy again
        outputs["deploy"] = _stage(state, "deploy", deploy_key, lambda: _deploy(checkpoint, config.deploy))
    elif config.deploy.enabled:
        print("[deploy] skipped: no long-running Ray cluster to deploy to (set RAY_ADDRESS or use `ray job submit`)")
    return outputs


def _stage(state: State, stage: str, inputs: str, action) -> dict:
    previous = state.unchanged(stage, inputs)
    if previous is not None:
        print(f"[{stage}] skipped: inputs unchanged since its last success ({state.records[stage]['finished']})", flush=True)
        return previous
    print(f"[{stage}] running", flush=True)
    started = time.perf_counter()
    try:
        outputs, summary = action()
    except Exception as error:  # noqa: BLE001 - reported with the stage's name; the state keeps the last success
        raise StageFailed(stage, error) from error
    state.record(stage, outputs.pop("_inputs", inputs), outputs)
    print(f"[{stage}] done in {time.perf_counter() - started:.0f} s: {summary}", flush=True)
    return outputs


def _read(uri: str) -> bytes:
    parent, key = split_uri(uri)
    return open_store(parent).read_bytes(key)


def _registry_index(config: WorkflowConfig) -> str:
    store = open_store(config.registry)
    return hashlib.sha256(store.read_bytes("registry.json")).hexdigest() if store.exists("registry.json") else ""


def _collect_inputs(manifest_bytes: bytes, config: WorkflowConfig) -> str:
    return digest(hashlib.sha256(manifest_bytes).hexdigest(), config.registry, _registry_index(config))


def _collect(manifest_uri: str, config: WorkflowConfig):
    outcome = collect(manifest_uri, config.registry)
    print_summary(outcome.rows)
    if not outcome.committed:
        raise RegistryError(f"the manifest {manifest_uri} was not registered (see the table above); the registry is unchanged")
    added = sum(row["status"] in ("added", "new version") for row in outcome.rows)
    inputs = _collect_inputs(_read(manifest_uri), config)  # the index as this commit left it
    return {"_inputs": inputs, "registry": config.registry}, f"{len(outcome.rows)} adapters, {added} new in {config.registry}"


def _train(config, work: Path, registry: Registry, experts, entries, key: str, previous: dict | None):
    settings = config.train_config()
    artifacts = (config.artifacts or str(work)).rstrip("/")
    values = {"registry": registry.uri, "experts": experts, "name": f"gates-{key[:12]}", "storage_path": f"{artifacts}/runs",
              "output": f"{artifacts}/checkpoints/gates-{key[:12]}"}
    old = [tuple(e) for e in (previous or {}).get("outputs", {}).get("experts", [])]
    if old and set(old) < set(entries) and previous["outputs"]["base"] == registry.base_model["fingerprint"]:
        steps = max(1, math.ceil(config.incremental_steps * settings.steps))
        values.update(init_from=previous["outputs"]["checkpoint"], steps=steps)
        print(f"[train] incremental: {len(entries) - len(old)} new adapter(s); starting from {values['init_from']}, "
              f"{steps} steps", flush=True)
    started = time.perf_counter()
    summary = train(config.train_config(**values))
    print_training_summary(summary, time.perf_counter() - started)
    outputs = {"checkpoint": summary["output"], "experts": entries, "base": registry.base_model["fingerprint"],
               "incremental": bool(values.get("init_from")), "train_seconds": summary["train_seconds"],
               "eval_routing_accuracy": (summary.get("final") or {}).get("eval_routing_accuracy")}
    return outputs, f"checkpoint {summary['output']} ({summary['steps']} steps, {summary['train_seconds']} s of training)"


@ray.remote(num_cpus=1)
def _evaluate_task(manifest_uri: str, checkpoint: str, settings: dict, out_dir: str) -> dict:
    from meteora.harness import evaluate, load_benchmark
    from meteora.store import local_dir

    parent, name = split_uri(manifest_uri)  # the baselines beside a remote manifest come with its mirrored directory
    bench = load_benchmark(local_dir(parent) / name if "://" in manifest_uri else manifest_uri, samples=settings["samples"])
    results = evaluate(bench, checkpoint, settings["composite"], settings["composite_count"], out_dir=out_dir)
    return {"per_task": results["per_task"], "composite": results["composite"]}


def _evaluate(manifest_uri: str, checkpoint: str, config: WorkflowConfig, work: Path):
    out_dir = work / "eval" / checkpoint.rstrip("/").rsplit("/", 1)[-1]
    task = _evaluate_task.options(runtime_env={"env_vars": worker_env()})  # the object store's endpoint and keys
    results = ray.get(task.remote(manifest_uri, checkpoint, config.evaluate.model_dump(), str(out_dir)))
    means = {variant: round(sum(scores.values()) / len(scores), 3) for variant, scores in results["per_task"].items()}
    return {"out_dir": str(out_dir), "mean_accuracy": means}, f"mean accuracy {means}; tables and plots in {out_dir}"


def _checkpoint_digest(checkpoint: str) -> str:
    store = open_store(checkpoint)
    return digest(*(hashlib.sha256(store.read_bytes(f)).hexdigest() for f in ("meteora_config.json", "gates.safetensors")))


def _app_running(app_name: str) -> bool:
    from ray import serve

    try:
        return serve.status().applications[app_name].status == "RUNNING"
    except Exception:  # noqa: BLE001 - no Serve on this cluster, or no such application
        return False


def _deploy(checkpoint: str, settings: DeploySettings):
    from ray import serve

    import serve_app

    serve.start(http_options={"host": settings.host, "port": settings.http_port})  # a running Serve keeps its own
    args = serve_app.ServeSettings.model_validate({**settings.settings, "checkpoint": checkpoint}).model_dump()
    updating = _app_running(settings.app_name)
    serve.run(serve_app.MeteoraServer.options(**settings.deployment).bind(args), name=settings.app_name,
              route_prefix=settings.route_prefix)
    verb = "updated in place" if updating else "started"
    return {"checkpoint": checkpoint, "app": settings.app_name}, f"application '{settings.app_name}' {verb} with {checkpoint}"


def load_config(path: str | Path | None, overrides: list[str]) -> WorkflowConfig:
    """The YAML file (default configs/workflow.yaml) with dotted key=value overrides (values parsed as YAML)."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        values = yaml.safe_load(path.read_text()) or {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"argument {item!r} is not key=value")
            *parents, leaf = key.strip().split(".")
            target = values
            for part in parents:
                target = target.setdefault(part, {})
            target[leaf] = yaml.safe_load(value)
        config = WorkflowConfig(**values)
        unexpected = sorted(SET_BY_WORKFLOW & set(config.train))
        if unexpected:
            raise ConfigError(f"train: {unexpected} are set by the workflow itself")
        config.train_config()  # the training settings are checked now, not when the train stage starts
        return config
    except (OSError, yaml.YAMLError, AttributeError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid workflow config ({path} + arguments): {problems}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="the adapter manifest (local path or s3://)")
    parser.add_argument("--config", default=None, help="YAML config (default configs/workflow.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value settings over the config file (dotted: train.steps=600)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(args.config, args.overrides)
        manifest = args.manifest if "://" in args.manifest else str(Path(args.manifest).resolve())
        load_manifest(manifest)  # a bad manifest fails before Ray starts
        with ray_connection() as started_here:
            outputs = run(manifest, config, can_deploy=not started_here)
    except (ConfigError, ManifestError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StageFailed as err:
        print(f"error: {err}\n(the stages before it are recorded; run again to resume at '{err.stage}')", file=sys.stderr)
        return 1
    print(json.dumps({stage: {k: v for k, v in out.items() if k != "experts"} for stage, out in outputs.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
