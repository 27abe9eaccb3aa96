"""How a Ray driver runs its work: the Ray it connects to, the environment its tasks and workers get, and where a
task that reads local paths must run.

    with ray_connection() as started_here: ...      # the initialized Ray, RAY_ADDRESS's, or a local one
    runtime_env()                                    # the driver's S3 settings and cache for tasks and workers
    task.options(**where_readable(uri, ...))         # a task reading or writing local paths: on this node
Paths handed to other processes go through meteora_moe.store.absolute_uri (remote URIs as they are).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from meteora_moe.store import is_remote

CHECKOUT = Path(__file__).parents[1]  # where pipelines/ is imported from
# bf16 on a CPU runs oneDNN, which keeps the primitives of every shape it has run (1,024 by default). The loop's
# batches change shape every step: a training worker on chattasks grew from 2.9 to 6.6 GB over its first 110
# steps; 30 steps in one process grew it by 2.5 GB at the default capacity, by 1.4 GB at 8, with steps no slower
ONEDNN_PRIMITIVES = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
# A local Ray without a dashboard (no fixed ports to collide with); Ray's own processes log errors only: the
# drivers print one progress line per stage or checkpoint themselves.
LOCAL_RAY = {"include_dashboard": False, "logging_config": ray.LoggingConfig(log_level="ERROR")}


@contextlib.contextmanager
def ray_connection():
    """The Ray a driver runs on: the one already initialized, RAY_ADDRESS's (or the job's under `ray job submit`),
    else a local Ray started here and shut down on leaving. Yields whether it was started here."""
    started_here = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(**(LOCAL_RAY if started_here else {"logging_config": LOCAL_RAY["logging_config"]}))
    try:
        yield started_here
    finally:
        if started_here:
            ray.shutdown()


def runtime_env() -> dict:
    """A runtime_env for tasks and Train workers: the driver's AWS settings (endpoint, credentials, retries: secrets
    only ever come from the environment) and cache; progress lines printed as they are; oneDNN's cache bounded; this
    checkout on the Python path, for the drivers' own modules (pipelines/ is run from the checkout, not installed;
    under `ray job submit --working-dir`, Ray puts the uploaded copy first)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k == "METEORA_CACHE"}
    path = os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))
    return {"env_vars": {**env, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "PYTHONPATH": path,
                         "ONEDNN_PRIMITIVE_CACHE_CAPACITY": ONEDNN_PRIMITIVES}}


def where_readable(*uris: str | Path | None) -> dict:
    """Ray task options that run a task where all of `uris` can be read: anywhere when they are all in the object
    store, else on this driver's node (a local path is only this node's, on a cluster of several)."""
    if all(uri is None or is_remote(uri) for uri in uris):
        return {}
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}
