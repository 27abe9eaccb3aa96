"""The adapter registry: content-addressed adapters and task data under one index, in any object store.

    registry.json                     format_version, base_model {name, uri, fingerprint},
                                      adapters {name: {sha256, config_sha256, content_sha256, rank, alpha,
                                      target_modules, description, data {train, eval: sha256}, metric, source_uri,
                                      registered_at, version}},
                                      baselines {name: {sha256, config_sha256, content_sha256, ...}} (optional:
                                      the manifest's baselines, evaluated beside MeteoRA, never fused)
    adapters/<content_sha256>/adapter_config.json, adapter_model.safetensors
                                      (sha256 is the weights' hash, as in the manifest; the directory is keyed by
                                      config and weights together, so two adapters differing only in alpha differ)
    data/<sha256>.jsonl

Readers only follow the index, so objects written before a commit are invisible until the one atomic write
of registry.json, a compare-and-swap against the index this run read. Names and hashes read from an index are
checked before they become paths.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import RegistryError
from ..model import NAME_PATTERN
from ..model.adapters import CONFIG_FILE, WEIGHTS_FILE
from ..store import LocalStore, atomic_write, cache_dir, open_store
from .manifest import SHA256

INDEX_FILE = "registry.json"
FORMAT_VERSION = 1


def adapter_key(sha256: str, file: str) -> str:
    return f"adapters/{sha256}/{file}"


def data_key(sha256: str) -> str:
    return f"data/{sha256}.jsonl"


class Registry:
    def __init__(self, uri: str | Path):
        self.uri = str(uri)
        self.store = open_store(uri)
        self._raw = self.store.read_bytes(INDEX_FILE) if self.store.exists(INDEX_FILE) else None
        self.index = _parse_index(self._raw, self.uri) if self._raw else {"format_version": FORMAT_VERSION,
                                                                            "base_model": None, "adapters": {}}

    @property
    def names(self) -> list[str]:
        return list(self.index["adapters"])

    @property
    def digest(self) -> str:
        """sha256 of the index as read ("" for a registry that holds nothing yet)."""
        return hashlib.sha256(self._raw).hexdigest() if self._raw else ""

    @property
    def base_model(self) -> dict | None:
        return self.index["base_model"]

    def entry(self, name: str) -> dict:
        if name not in self.index["adapters"]:
            raise RegistryError(f"registry {self.uri} has no adapter '{name}'; it holds {self.names}")
        return self.index["adapters"][name]

    def trained_on(self, name: str) -> dict:
        """What the gates learn from an adapter besides its weights' sha256: the whole adapter (its config's alpha
        too), its task data and its prompt format. Gates trained on other values are other gates."""
        entry = self.entry(name)
        return {key: entry.get(key) for key in ("content_sha256", "data", "prompt_format")}

    def adapter_dirs(self, names: list[str] | None = None) -> dict[str, Path]:
        """{name: local PEFT adapter directory} in registry order (S3 objects are cached locally, hash-checked)."""
        return {name: self._local_adapter(self.entry(name)) for name in (names or self.names)}

    def baseline_dirs(self, names: list[str]) -> dict[str, Path]:
        """{name: local PEFT directory} of the baselines `names`, as adapter_dirs."""
        held = self.index.get("baselines", {})
        missing = [name for name in names if name not in held]
        if missing:
            raise RegistryError(f"registry {self.uri} has no baselines {missing}; it holds {sorted(held)}")
        return {name: self._local_adapter(held[name]) for name in names}

    def prompt_format(self, names: list[str]) -> str:
        """The prompt format the adapters `names` were trained in: one, or RegistryError (a fused model has one)."""
        formats = sorted({self.entry(name).get("prompt_format", "plain") for name in names})
        if len(formats) != 1:
            raise RegistryError(f"registry {self.uri}: adapters {names} mix prompt formats {formats}; fuse one format")
        return formats[0]

    def data_file(self, name: str, split: str) -> Path:
        sha = self.entry(name).get("data", {}).get(split)
        if sha is None:
            raise RegistryError(f"registry {self.uri}: adapter '{name}' has no {split} data")
        return self._local(data_key(sha), sha)

    def commit(self, index: dict) -> None:
        """Write a new index in one atomic compare-and-swap: refused if anyone changed it since this registry was
        read, so of two collections committing at once one wins and the other is told to run again."""
        raw = json.dumps(index, indent=2, sort_keys=False).encode() + b"\n"
        if not self.store.write_if_unchanged(INDEX_FILE, raw, self._raw):
            raise RegistryError(f"registry {self.uri} changed while this run was collecting; run it again")
        self._raw, self.index = raw, index

    def remove(self, names: list[str]) -> None:
        """Drop adapters from the index in one compare-and-swap commit. Their content-addressed files stay (another
        entry may share them); nothing is changed when a name is unknown. An emptied registry takes any base again
        (its baselines, trained on the old one, go too)."""
        for name in names:
            self.entry(name)
        kept = {n: e for n, e in self.index["adapters"].items() if n not in names}
        self.commit({**self.index, "adapters": kept, **({} if kept else {"base_model": None, "baselines": {}})})

    def _local_adapter(self, entry: dict) -> Path:
        weights = self._local(adapter_key(entry["content_sha256"], WEIGHTS_FILE), entry["sha256"])
        self._local(adapter_key(entry["content_sha256"], CONFIG_FILE), entry["config_sha256"])
        return weights.parent

    def _local(self, key: str, sha: str) -> Path:
        """A local path holding the object `key` (itself for a local registry; a verified cached copy for S3)."""
        if isinstance(self.store, LocalStore):
            return self.store.root / key
        path = cache_dir() / key
        if not (path.is_file() and _sha256(path.read_bytes()) == sha):
            data = self.store.read_bytes(key)
            if _sha256(data) != sha:
                raise RegistryError(f"registry {self.uri}: object {key} does not match its sha256")
            atomic_write(path, data)
        return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parse_index(raw: bytes, uri: str) -> dict:
    where = f"{uri}/{INDEX_FILE}"
    try:
        index = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RegistryError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(index, dict) or index.get("format_version") != FORMAT_VERSION:
        raise RegistryError(f"{where}: format_version must be {FORMAT_VERSION}")
    if not isinstance(index.get("adapters"), dict) or not isinstance(index.get("base_model"), (dict, type(None))):
        raise RegistryError(f"{where}: 'adapters' must be a mapping and 'base_model' a mapping or null")
    if not isinstance(index.get("baselines", {}), dict):
        raise RegistryError(f"{where}: 'baselines' must be a mapping")
    for name, entry in [*index["adapters"].items(), *index.get("baselines", {}).items()]:
        if not isinstance(entry, dict) or not isinstance(entry.get("data", {}), dict):
            raise RegistryError(f"{where}: entry {name!r} must be a mapping")
        shas = [entry.get(k) for k in ("sha256", "config_sha256", "content_sha256")] + list(entry.get("data", {}).values())
        if not NAME_PATTERN.fullmatch(name) or not all(isinstance(s, str) and SHA256.fullmatch(s) for s in shas):
            raise RegistryError(f"{where}: entry {name!r} has an invalid name or sha256 (refusing to build paths from it)")
    return index
