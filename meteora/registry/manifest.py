"""The adapter manifest: a YAML file that lists adapters (and their task data) in an object store.

    apiVersion: meteora/v1
    kind: AdapterManifest
    base_model: {name: tinytasks-base, uri: s3://meteora-demo/base/}
    adapters:                                   # order = expert order for a new model
      - name: reverse                           # ^[a-z0-9][a-z0-9_.-]{0,62}$, unique
        uri: s3://meteora-demo/adapters/reverse/
        description: Reverse the characters of the input     # optional
        sha256: 9f2c...                         # optional, of adapter_model.safetensors
        data: {train: s3://.../train.jsonl, eval: s3://.../eval.jsonl}   # optional
        metric: exact_match                     # optional: exact_match | contains | bleu | rouge_l
        prompt_format: chat                     # optional: plain (default) | chat (meteora_moe.prompts)
    baselines:                                  # optional: PEFT adapters evaluated beside MeteoRA (not experts)
      - {name: lora-b, uri: s3://meteora-demo/baselines/lora-b/}     # description, sha256: optional

Unknown keys are errors (a typo must not be silently ignored). Every error names the file, the adapter and
the field. Relative paths are read relative to the manifest's directory.
"""
from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ManifestError, StoreError
from ..model import NAME_PATTERN
from ..prompts import FORMATS
from ..store import absolute_uri, is_remote, open_store, split_uri

API_VERSION, KIND = "meteora/v1", "AdapterManifest"
METRICS = ("exact_match", "contains", "bleu", "rouge_l")  # meteora_moe.evaluation scores each (tested to agree)
SHA256 = re.compile(r"^[0-9a-f]{64}$")
DATA_SPLITS = ("train", "eval")


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    uri: str
    description: str = ""
    sha256: str | None = None
    data: dict[str, str] | None = None  # split -> URI
    metric: str = "exact_match"
    prompt_format: str = "plain"  # how the adapter's samples are written: plain | chat


@dataclass(frozen=True)
class Manifest:
    path: str  # where it was read from: an absolute local path or an s3:// URI
    digest: str  # sha256 of its bytes
    base_name: str
    base_uri: str
    adapters: tuple[AdapterSpec, ...]
    baselines: tuple[AdapterSpec, ...] = ()  # collected into the registry like adapters, never fused as experts

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.adapters]


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest: a local path, file:// or s3:// URI."""
    import yaml

    text = absolute_uri(path)
    root, name = split_uri(text)
    try:
        raw = open_store(root).read_bytes(name) if is_remote(text) else Path(text).read_bytes()
        document = yaml.safe_load(raw)
    except (OSError, StoreError) as err:
        raise ManifestError(f"{text}: cannot be read: {getattr(err, 'strerror', None) or err}") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"{text}: not valid YAML: {err}") from None
    return parse_manifest(document, text, root, hashlib.sha256(raw).hexdigest())


def parse_manifest(document, where: str, root: str, digest: str = "") -> Manifest:
    """Check a manifest's document; relative URIs in it are taken from `root` (its directory or prefix)."""
    _mapping(document, where, required=("apiVersion", "kind", "base_model", "adapters"), optional=("baselines",))
    if document["apiVersion"] != API_VERSION or document["kind"] != KIND:
        raise ManifestError(f"{where}: apiVersion/kind must be {API_VERSION}/{KIND}, got "
                            f"{document['apiVersion']!r}/{document['kind']!r}")
    base = _mapping(document["base_model"], f"{where}: base_model", required=("name", "uri"))
    adapters = document["adapters"]
    if not isinstance(adapters, list) or not adapters:
        raise ManifestError(f"{where}: field 'adapters' must be a non-empty list")
    specs = tuple(_adapter(entry, f"{where}: adapters[{i}]", root) for i, entry in enumerate(adapters))
    baselines = document.get("baselines", [])
    if not isinstance(baselines, list):
        raise ManifestError(f"{where}: field 'baselines' must be a list")
    extra = tuple(_baseline(entry, f"{where}: baselines[{i}]", root) for i, entry in enumerate(baselines))
    for kind, group in (("adapter", specs), ("baseline", extra)):
        names = [spec.name for spec in group]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ManifestError(f"{where}: duplicate {kind} names {duplicates}")
    base_uri = _resolve(_string(base, "uri", f"{where}: base_model"), root)
    return Manifest(where, digest, _string(base, "name", f"{where}: base_model"), base_uri, specs, extra)


def _adapter(entry, where: str, root: str) -> AdapterSpec:
    optional = ("description", "sha256", "data", "metric", "prompt_format")
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        where = f"{where} ('{entry['name']}')"
    _mapping(entry, where, required=("name", "uri"), optional=optional)
    name = _string(entry, "name", where)
    if not NAME_PATTERN.fullmatch(name):
        raise ManifestError(f"{where}: field 'name' {name!r} must match {NAME_PATTERN.pattern} (it becomes a path)")
    sha = entry.get("sha256")
    if sha is not None and not (isinstance(sha, str) and SHA256.fullmatch(sha)):
        raise ManifestError(f"{where}: field 'sha256' must be 64 lowercase hex digits, got {sha!r}")
    metric = entry.get("metric", "exact_match")
    if metric not in METRICS:
        raise ManifestError(f"{where}: field 'metric' must be one of {list(METRICS)}, got {metric!r}")
    data = entry.get("data")
    if data is not None:
        _mapping(data, f"{where}: data", required=(), optional=DATA_SPLITS)
        data = {split: _resolve(_string(data, split, f"{where}: data"), root) for split in DATA_SPLITS if split in data}
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise ManifestError(f"{where}: field 'description' must be a string")
    prompt_format = entry.get("prompt_format", "plain")
    if prompt_format not in FORMATS:
        raise ManifestError(f"{where}: field 'prompt_format' must be one of {list(FORMATS)}, got {prompt_format!r}")
    return AdapterSpec(name, _resolve(_string(entry, "uri", where), root), description, sha, data or None, metric,
                       prompt_format)


def _baseline(entry, where: str, root: str) -> AdapterSpec:
    """A baseline: an adapter entry without data, metric or prompt format (it is scored on the tasks' own)."""
    named = f"{where} ('{entry['name']}')" if isinstance(entry, dict) and isinstance(entry.get("name"), str) else where
    _mapping(entry, named, required=("name", "uri"), optional=("description", "sha256"))
    return _adapter(entry, where, root)


def _mapping(value, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: must be a mapping, got {type(value).__name__}")
    missing = [key for key in required if key not in value]
    if missing:
        raise ManifestError(f"{where}: missing required field(s) {missing}")
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(required + optional)}")
    return value


def _string(mapping: dict, key: str, where: str) -> str:
    value = mapping[key]
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{where}: field '{key}' must be a non-empty string, got {value!r}")
    return value


def _resolve(uri: str, root: str) -> str:
    """A relative URI taken from the manifest's location (`root`); in an object store "." and ".." are folded
    into the key, which must stay inside its bucket."""
    if "://" in uri or Path(uri).is_absolute():
        return uri
    if "://" not in root:
        return str(Path(root) / uri)
    scheme, rest = root.split("://", 1)
    bucket, _, prefix = rest.partition("/")
    key = posixpath.normpath(posixpath.join(prefix, uri))
    if key == ".." or key.startswith("../"):
        raise ManifestError(f"the relative URI {uri!r} climbs out of the bucket of {root}")
    return f"{scheme}://{bucket}/{key}" + ("/" if uri.endswith("/") else "")
