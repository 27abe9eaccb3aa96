"""The adapter workflow as one Ray job: collect -> train the gates -> deploy -> [refine -> deploy] -> evaluate.

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
deploy    the checkpoint's content, the serving settings      deploy.deploy: serve.run, a running application updated in
                                                              place (new replicas start before old ones drain)
refine    the train stage's inputs, refine_steps              with train.method fit and refine_steps > 0, once the fit
                                                              serves: method fit+sgd from the fit's own start (the
                                                              same warm start and frozen rows), then deploy again
evaluate  the checkpoint's content, the evaluation settings   evaluate.evaluate_manifest in a Ray task on the driver's
                                                              node (work_dir is local to it), reading the registry:
                                                              tables, plots (after deploy: it reports on what
                                                              serves, gates nothing)
A stage whose inputs hash as at its last success is skipped and says so; its record in
<work_dir>/workflow_state.json is written only when it succeeds, so a failed run resumes at the failed stage (a
failed training resumes its Ray Train run from the latest checkpoint). Deploy needs a cluster that outlives the
job (RAY_ADDRESS, or `ray job submit`): on a Ray started by the workflow itself it is skipped.
The configuration is workflow_config.py's, the state file workflow_state.py's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # `python pipelines/workflow.py` from anywhere

import ray  # noqa: E402

from meteora_moe import RegistryError, StoreError  # noqa: E402
from meteora_moe.model import checkpoint_digest, checkpoint_exists  # noqa: E402
from meteora_moe.registry import Manifest, Registry, load_manifest, source_tags  # noqa: E402
from pipelines.collect_adapters import collect, print_summary  # noqa: E402
from pipelines.deploy import app_running, deploy  # noqa: E402
from pipelines.evaluate import evaluate_task  # noqa: E402
from pipelines.ray_env import ray_connection, runtime_env, where_readable  # noqa: E402
from pipelines.train_gates import print_training_summary, train  # noqa: E402
from pipelines.workflow_config import WorkflowConfig, load_workflow_config  # noqa: E402
from pipelines.workflow_state import (Collected, Evaluated, StageFailed, StageResult, State, Trained,  # noqa: E402
                                      digest)

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
    _recorded_checkpoint(state, "train", train_key)  # forgotten if its checkpoint is gone: trained again
    previous = state.outputs("train")
    outputs["train"] = _stage(state, "train", train_key, lambda: _train(config, work, registry, experts, train_key, previous))
    checkpoint = outputs["train"].checkpoint
    refine_key = digest(train_key, config.refine_steps)
    refining = config.refine_steps > 0 and config.train_config().training.method == "fit"
    refined = _recorded_checkpoint(state, "refine", refine_key) if refining else None
    if refined is not None:
        checkpoint = refined.checkpoint  # refined already: serve that, not the fit first
    if config.deploy.enabled and can_deploy:  # before the evaluation: it reports on what serves, gates nothing
        outputs["deploy"] = _deploy(state, checkpoint, config)
    elif config.deploy.enabled:
        print("[deploy] skipped: no long-running Ray cluster to deploy to (set RAY_ADDRESS or use `ray job submit`)")
    if refining:  # the fit serves meanwhile
        trained = outputs["train"]
        outputs["refine"] = _stage(state, "refine", refine_key, lambda: _refine(config, work, registry, trained, refine_key))
        if outputs["refine"].checkpoint != checkpoint and "deploy" in outputs:
            outputs["deploy"] = _deploy(state, outputs["refine"].checkpoint, config)
        checkpoint = outputs["refine"].checkpoint
    if config.evaluate.enabled:
        content = checkpoint_digest(checkpoint)
        outputs["evaluate"] = _stage(state, "evaluate", digest(content, config.evaluate.model_dump(), manifest.digest),
                                     lambda: _evaluate(manifest, checkpoint, config, work))
    return outputs


def _recorded_checkpoint(state: State, stage: str, inputs: str) -> Trained | None:
    """A training stage's recorded outputs for these inputs; a record whose checkpoint is gone is forgotten (the
    stage runs again) and gives None."""
    recorded = state.outputs(stage, inputs)
    if recorded is not None and not checkpoint_exists(recorded.checkpoint):
        state.forget(stage)
        return None
    return recorded


def _deploy(state: State, checkpoint: str, config: WorkflowConfig):
    if not app_running(config.deploy.app_name):
        state.forget("deploy")  # recorded, but not running now (a restarted cluster): deploy again
    return _stage(state, "deploy", digest(checkpoint_digest(checkpoint), config.deploy.model_dump()),
                  lambda: deploy(checkpoint, config.deploy))


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
    values = {}
    if _can_start_from(previous, experts, registry, settings_digest):
        steps = max(1, math.ceil(config.incremental_steps * settings.training.steps))
        values.update(init_from=previous.checkpoint, steps=steps, freeze_old=config.incremental_freeze_old)
        added = [n for n, sha in experts if (n, sha) not in previous.experts]
        removed = [n for n, sha in previous.experts if (n, sha) not in experts]
        how = {"fit": "the fresh rows fitted", "sgd": f"{steps} steps", "fit+sgd": f"the fresh rows fitted, {steps} steps"}
        print(f"[train] incremental from {previous.checkpoint}, {how[settings.training.method]}: fresh gate rows for "
              f"{added or 'none'}, rows dropped for {removed or 'none'}"
              f"{', copied rows frozen' if config.incremental_freeze_old else ''}", flush=True)
    return _run_training(config, work, registry, experts, key, values, settings_digest)


def _refine(config: WorkflowConfig, work: Path, registry: Registry, trained: Trained, key: str) -> StageResult:
    """The loop from where the fit started (method fit+sgd: the same fit, then refine_steps steps; incremental: the
    same warm start, copied rows as the fit held them)."""
    values = {"method": "fit+sgd", "steps": config.refine_steps}
    if trained.init_from:
        values.update(init_from=trained.init_from, freeze_old=config.incremental_freeze_old)
    return _run_training(config, work, registry, trained.experts, key, values, trained.settings)


def _run_training(config: WorkflowConfig, work: Path, registry: Registry, experts: list[tuple[str, str]], key: str,
                  training: dict, settings_digest: str) -> StageResult:
    """One train_gates run of `experts` with the `training` settings on top of the workflow's, as a StageResult."""
    artifacts = (config.artifacts or str(work)).rstrip("/")
    values = {"registry": registry.uri, "experts": [name for name, _ in experts], "storage_path": f"{artifacts}/runs",
              **training}
    run_name = f"gates-{digest(key, values)[:12]}"  # a retry resumes its run; another warm start is another run
    values.update(name=run_name, output=f"{artifacts}/checkpoints/{run_name}")
    started = time.perf_counter()
    summary = train(config.train_config(**values))
    print_training_summary(summary, time.perf_counter() - started)
    outputs = Trained(summary["output"], experts, registry.base_model["fingerprint"], "init_from" in values,
                      summary["train_seconds"], (summary.get("final") or {}).get("eval_routing_accuracy"),
                      settings_digest, values.get("init_from"))
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
    task = evaluate_task.options(runtime_env=runtime_env(), **where_readable(str(out_dir), config.registry))
    for streamed in task.remote(manifest, config.registry, checkpoint, config.evaluate, str(out_dir)):  # progress, tables
        item = ray.get(streamed)
        if isinstance(item, str):
            print(f"[evaluate] {item}", flush=True)
    results = item
    means = {variant: round(sum(scores.values()) / len(scores), 3) for variant, scores in results["per_task"].items()}
    return StageResult(Evaluated(str(out_dir), means), f"mean accuracy {means}; tables and plots in {out_dir}")


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
