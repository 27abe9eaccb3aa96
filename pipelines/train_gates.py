"""Train the MeteoRA gates over a registry's adapters with Ray Train, and write a MeteoRA checkpoint.

    python pipelines/train_gates.py [--config configs/train_gates.yaml] [--init-from CHECKPOINT] [key=value ...]
    ray job submit --address http://127.0.0.1:PORT --working-dir . -- python pipelines/train_gates.py

1. validate the config, the registry and the warm start (nothing starts when one is wrong: exit 2)
2. with no registry given: build the embedded tinytasks benchmark (cached) and collect it into a registry
3. Ray Train TorchTrainer: `num_workers` data-parallel workers (pipelines/gate_worker.py) train the gates only,
   checkpointing the gates + optimizer every `checkpoint_every` steps to `storage_path` (local or s3://);
   a lost worker is replaced and the group resumes from the latest checkpoint (`max_failures` times), and so
   does a run whose storage failed while a checkpoint was recorded
4. rank 0 writes the MeteoRA checkpoint to `output`; the summary is printed and kept in its config
Running again with the same `name` and `storage_path` resumes the run (after a driver restart, say); a name
that already holds a run over other experts, another warm start or other settings is refused. Uses the cluster
of RAY_ADDRESS (or the job's cluster under `ray job submit`), else starts a local Ray and stops it at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).parents[1]))  # `python pipelines/train_gates.py` from anywhere

import ray  # noqa: E402
import ray.train  # noqa: E402
from pyarrow.fs import S3FileSystem  # noqa: E402
from ray.train.torch import TorchConfig, TorchTrainer  # noqa: E402

from meteora_moe import CheckpointError, StoreError  # noqa: E402
from meteora_moe.model import read_checkpoint_config  # noqa: E402
from meteora_moe.registry import Registry, load_manifest  # noqa: E402
from meteora_moe.store import absolute_uri, cache_dir, is_remote, open_store  # noqa: E402
from pipelines.collect_adapters import collected  # noqa: E402
from pipelines.config_files import ConfigError  # noqa: E402
from pipelines.ray_env import ray_connection, runtime_env  # noqa: E402
from pipelines.gate_worker import PROGRESS_FILE, progress_line, train_loop_per_worker  # noqa: E402
from pipelines.train_config import TrainGatesConfig, load_train_config  # noqa: E402

log = logging.getLogger("train_gates")
RUN_FILE = "meteora_run.json"  # beside Ray Train's files: which experts this run name trains
PEER_TIMEOUT_S = 120  # a dead peer fails the step after this long instead of Ray's default 30 minutes
STORAGE_RETRY_S = 5  # the wait before resuming a run whose storage failed


def train(config: TrainGatesConfig) -> dict:
    """Run the whole job on the connected Ray cluster; returns the training summary of the written checkpoint."""
    registry = Registry(absolute_uri(config.registry or embedded_registry()))
    if config.init_from:  # the workers run in Ray Train's own directories: a relative path must not reach them
        config = config.model_copy(update={"init_from": absolute_uri(config.init_from)})
    experts = _check_experts(registry, config.experts)
    storage = absolute_uri(config.storage_path or cache_dir() / "ray_results")
    run = f"{storage.rstrip('/')}/{config.name}"  # Ray Train's directory of this run
    output = absolute_uri(config.output or f"{run}/meteora")
    _check_init_from(config, registry)
    _check_shared(registry=registry.uri, storage_path=storage, output=output, init_from=config.init_from)
    _claim_run(run, config, [(n, registry.entry(n)["sha256"], registry.trained_on(n)) for n in experts])
    job = {"config": config.flat(), "registry": registry.uri, "experts": experts, "output": output, "run": run}
    log.info("training the gates of %d experts (%s) with %d workers; run '%s' in %s",
             len(experts), ", ".join(experts), config.num_workers, config.name, storage)
    with _progress_printed(run, config.training.steps):
        _fit(config, job, storage)
    return {**read_checkpoint_config(output).training, "output": output}


def _fit(config: TrainGatesConfig, job: dict, storage: str) -> None:
    """Ray Train's fit, run again from the run's latest checkpoint when its storage failed (an object store down
    while the controller records a checkpoint fails the whole fit, not one attempt), up to max_failures times."""
    for failures in itertools.count():
        try:
            return _trainer(config, job, storage).fit()
        except ray.train.ControllerError as err:
            if failures >= config.max_failures or not isinstance(err.controller_failure, OSError):
                raise
            log.warning("run '%s': its storage failed (%s); resuming from its latest checkpoint in %d s",
                        config.name, str(err.controller_failure).splitlines()[0], STORAGE_RETRY_S)
            time.sleep(STORAGE_RETRY_S)


def _trainer(config: TrainGatesConfig, job: dict, storage: str) -> TorchTrainer:
    path, filesystem = _storage_location(storage)
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=job,
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                               resources_per_worker={"CPU": config.cpus_per_worker},
                                               placement_strategy=config.placement),
        run_config=ray.train.RunConfig(
            name=config.name, storage_path=path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            worker_runtime_env=runtime_env(),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),  # its every report and checkpoint: Ray's log files
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo", timeout_s=PEER_TIMEOUT_S),
    )


@contextlib.contextmanager
def _progress_printed(run: str, steps: int, every_s: float = 5.0):
    """Print rank 0's records (PROGRESS_FILE in the run's storage) from the driver while the run trains, so they
    show in the driver's output (a job's log, the workflow's, the demo's) whether or not the workers' logs do."""
    store, stop, last = open_store(run), threading.Event(), None

    def show() -> None:
        nonlocal last
        try:
            record = json.loads(store.read_bytes(PROGRESS_FILE)) if store.exists(PROGRESS_FILE) else None
        except (StoreError, ValueError):
            return  # unreadable for now: the next poll
        if record is not None and record != last:  # a new checkpoint's record
            last = record
            print(progress_line(record, steps), flush=True)

    def poll() -> None:
        while not stop.wait(every_s):
            show()

    thread = threading.Thread(target=poll, name="training-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        show()


def embedded_registry() -> str:
    """The tinytasks benchmark (built if missing) collected into a registry in the cache; returns its URI."""
    from suites.tinytasks import build

    manifest = load_manifest(build())
    return collected(manifest, str(cache_dir() / "registries" / Path(manifest.path).parent.name)).uri


def _check_experts(registry: Registry, names: list[str] | None) -> list[str]:
    if not registry.names:
        raise ConfigError(f"registry {registry.uri} holds no adapters: collect some first (pipelines/collect_adapters.py)")
    names = names or registry.names
    unknown = [n for n in names if n not in registry.names]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(f"experts: {unknown or names} must be distinct adapters of registry {registry.uri} {registry.names}")
    for name in names:
        for split in ("train", "eval"):
            if split not in (registry.entry(name).get("data") or {}):
                raise ConfigError(f"registry {registry.uri}: adapter '{name}' has no {split} data to train its gate on")
    registry.prompt_format(names)  # one format for all
    return names


def _check_shared(**uris: str | None) -> None:
    """On a cluster of several nodes the workers read and write through the object store: a local path is only
    the driver's node's (Ray Train fails at its first checkpoint on a local storage_path there)."""
    nodes = sum(node["Alive"] for node in ray.nodes())
    local = [key for key, uri in uris.items() if uri is not None and not is_remote(uri)]
    if nodes > 1 and local:
        raise ConfigError(f"{', '.join(local)}: local paths, but this Ray cluster has {nodes} nodes: put them on "
                          "shared storage (s3://bucket/prefix) that every node reads")


def _check_init_from(config: TrainGatesConfig, registry: Registry) -> None:
    if not config.init_from:
        return
    meta = read_checkpoint_config(config.init_from)  # a bad one fails here, before the workers start
    if meta.base.fingerprint.structure != registry.base_model["fingerprint"]:
        raise CheckpointError(f"init_from {config.init_from}: it was trained on base model "
                              f"'{meta.base.name}', the registry's is '{registry.base_model['name']}'")


def _claim_run(run: str, config: TrainGatesConfig, experts: list[tuple]) -> None:
    """Record what the run name trains; refuse to resume a run of other experts (or other versions of them: weights,
    config, data, prompt format), warm start or settings under it."""
    store = open_store(run)
    claim = {"fingerprint": config.run_fingerprint(experts), "experts": [expert[0] for expert in experts],
             "init_from": config.init_from, "settings": config.run_settings()}
    if store.exists(RUN_FILE):
        try:
            held = dict(json.loads(store.read_bytes(RUN_FILE)))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{store.uri}/{RUN_FILE} is not a run record ({err}): choose another name=") from None
        if held.get("fingerprint") != claim["fingerprint"]:
            settings = held.get("settings") or {}
            changed = sorted(k for k, v in claim["settings"].items() if k in settings and settings[k] != v)
            raise ConfigError(f"run {run} already trains experts {held.get('experts')} "
                              f"(init_from {held.get('init_from')}{f'; other {changed}' if changed else ''}): "
                              "resume it with its own settings, or choose another name= to start a new run")
        log.info("run %s exists: resuming from its latest checkpoint", run)
        return
    if not store.write_if_unchanged(RUN_FILE, json.dumps(claim, indent=2).encode(), None):
        _claim_run(run, config, experts)  # another driver claimed the name first: resume its run, or refuse it


def _storage_location(storage: str) -> tuple[str, S3FileSystem | None]:
    """Ray Train's (storage_path, storage_filesystem): S3 with the endpoint and keys of the environment."""
    if not storage.startswith("s3://"):
        return storage, None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options = {"access_key": os.environ.get("AWS_ACCESS_KEY_ID"), "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
               "session_token": os.environ.get("AWS_SESSION_TOKEN"),
               "region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"}
    if endpoint:
        parsed = urlparse(endpoint)
        options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return storage.removeprefix("s3://"), S3FileSystem(**{k: v for k, v in options.items() if v is not None})


def print_training_summary(summary: dict, wall_seconds: float) -> None:
    final, fit, nan = summary.get("final") or {}, summary.get("fit"), float("nan")
    if fit:
        accuracy = f"; mean fit accuracy {fit['fit_accuracy']:.3f}" if fit["modules"] else ""
        print(f"gates fitted: {fit['modules']} modules on {fit['tokens']} labelled tokens in {fit['seconds']:.0f} s "
              f"({summary['num_workers']} worker(s)){accuracy}")
    if summary["steps"]:
        print(f"gates trained: {summary['steps']} steps x {summary['batch']} samples on {summary['num_workers']} worker(s); "
              f"final loss {final.get('loss', nan):.4f} (lm {final.get('lm_loss', nan):.4f}, "
              f"gate {final.get('gate_loss', nan):.4f})")
    print(f"  routing accuracy on eval response tokens {final.get('eval_routing_accuracy', nan):.3f}; "
          f"training {summary['train_seconds']} s{f' ({s} samples/s)' if (s := summary['samples_per_s']) else ''}, "
          f"{len(summary['attempts'])} attempt(s), job {wall_seconds:.0f} s")
    warm = summary.get("warm_start")
    if warm:
        fresh = [name for name, how in warm["experts"].items() if how == "fresh"]
        new_modules = [name for name, how in warm["modules"].items() if how == "new"]
        drawn = f"; {summary['new_fraction']:.2f} of every batch from the fresh experts" if summary["steps"] else ""
        print(f"  started from {warm['init_from']}: fresh rows for {fresh or 'no expert'}, "
              f"{len(new_modules)} new module gate(s){drawn}, copied rows frozen: {summary['freeze_old']}")
    print(f"  MeteoRA checkpoint: {summary['output']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default configs/train_gates.yaml)")
    parser.add_argument("--init-from", default=None, help="MeteoRA checkpoint to start the gates from (= init_from=)")
    parser.add_argument("overrides", nargs="*", help="key=value settings over the config file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_train_config(args.config, args.overrides + ([f"init_from={args.init_from}"] if args.init_from else []))
        started = time.perf_counter()
        with ray_connection():
            summary = train(config)
    except (ValueError, StoreError) as err:  # meteora's and the config's user errors, each naming what is wrong
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ray.train.TrainingFailedError as err:
        print(f"error: training failed: {err}", file=sys.stderr)
        return 1
    print_training_summary(summary, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
