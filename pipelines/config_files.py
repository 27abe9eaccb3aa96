"""The drivers' config files: YAML checked by a pydantic model, with dotted key=value overrides from the command line.

    load_config(Model, path, ["train.steps=600"])   # unknown keys and bad values raise ConfigError naming them
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ValidationError

from meteora_moe.store import checked_uri

ROOT = Path(__file__).parents[1]  # the repository: configs/ holds the default files
Config = TypeVar("Config", bound=BaseModel)
Uri = Annotated[str, AfterValidator(checked_uri)]  # a config field naming a store: local path, file:// or s3://


class ConfigError(ValueError):
    """A driver's configuration is wrong: the message names the key or file."""


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
