"""The plumbing every Ray driver shares: the Ray connection, the workers' environment, and config files.

    with ray_connection() as started_here: ...      # the initialized Ray, RAY_ADDRESS's, or a local one
    runtime_env()                                    # the driver's S3 settings and cache for tasks and workers
    task.options(**where_readable(uri, ...))         # a task reading or writing local paths: on this node
    load_config(Model, path, ["train.steps=600"])   # YAML + dotted key=value overrides, checked by pydantic
Paths handed to other processes go through meteora.store.absolute_uri (remote URIs as they are).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, TypeVar

import ray
import yaml
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from pydantic import AfterValidator, BaseModel, ValidationError

from meteora.store import checked_uri, is_remote

ROOT = Path(__file__).parents[1]
# A local Ray without a dashboard (no fixed ports to collide with); Ray's own processes log errors only: the
# drivers print one progress line per stage or checkpoint themselves.
LOCAL_RAY = {"include_dashboard": False, "logging_config": ray.LoggingConfig(log_level="ERROR")}

Config = TypeVar("Config", bound=BaseModel)
Uri = Annotated[str, AfterValidator(checked_uri)]  # a config field naming a store: local path, file:// or s3://


class ConfigError(ValueError):
    """A driver's configuration is wrong: the message names the key or file."""


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
    only ever come from the environment) and cache; progress lines printed as they are."""
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k == "METEORA_CACHE"}
    return {"env_vars": {**env, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}


def where_readable(*uris: str | Path | None) -> dict:
    """Ray task options that run a task where all of `uris` can be read: anywhere when they are all in the object
    store, else on this driver's node (a local path is only this node's, on a cluster of several)."""
    if all(uri is None or is_remote(uri) for uri in uris):
        return {}
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def load_config(model: type[Config], path: str | Path, overrides: list[str]) -> Config:
    """`model` from the YAML file at `path` with `key=value` overrides (values parsed as YAML; dotted keys reach
    into sections: train.steps=600). Unknown keys and bad values raise ConfigError naming them."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"argument {item!r} is not key=value")
        *sections, leaf = key.strip().split(".")
        target = values
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"argument {item!r}: {section!r} is not a section")
        try:
            target[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"argument {item!r}: the value is not valid YAML: {err}") from None
    try:
        return model(**values)
    except (ValidationError, ValueError) as err:
        raise ConfigError(f"invalid config ({path} + arguments): {_problems(err)}") from None


def _problems(err: Exception) -> str:
    if not isinstance(err, ValidationError):
        return str(err)
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
