"""Collecting a manifest's adapters into a registry: the steps, without any scheduling (the Ray driver in
pipelines/collect_adapters.py runs `fetch_adapter` in parallel tasks).

    inspect_base(manifest)              the base model's config -> a weightless skeleton and its structure hash
    fetch_adapter(spec, base_config)    read one adapter (and its data) from its store and check everything;
                                        -> Collected: the registry entry and the content-addressed files, or why not
    plan_index(registry, ...)           the new index and a summary row per adapter and baseline (added /
                                        unchanged / new version / updated / rejected)
Nothing here writes to the registry: the driver commits only when every adapter was accepted.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..errors import StoreError
from ..model import is_gguf, model_dir, skeleton_from_config, structure_hash
from ..model.adapters import CONFIG_FILE, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE, adapter_from_bytes, pickle_only_error
from ..store import open_store, read_uri, split_uri
from .manifest import AdapterSpec, Manifest
from .registry import Registry, adapter_key, data_key


METADATA = ("description", "metric", "prompt_format", "source_uri")  # entry fields that change without a new version


@dataclass
class Collected:
    name: str
    entry: dict | None = None  # registry entry without registered_at / version, when accepted
    files: dict[str, bytes] = field(default_factory=dict)  # registry key -> content
    error: str | None = None


def inspect_base(manifest: Manifest) -> tuple[dict, dict]:
    """(config.json of the base model, registry base_model {name, uri, fingerprint}). Only the config is read,
    but a GGUF base is converted (once: meteora/model/gguf.py) to know it."""
    try:
        if is_gguf(manifest.base_uri):
            config = json.loads((model_dir(manifest.base_uri) / "config.json").read_text())
        else:
            config = json.loads(open_store(manifest.base_uri).read_bytes("config.json"))
        skeleton = skeleton_from_config(config)
    except (StoreError, OSError, ValueError) as err:
        raise ValueError(f"{manifest.path}: base model {manifest.base_uri}: {err}") from None
    return config, {"name": manifest.base_name, "uri": manifest.base_uri, "fingerprint": structure_hash(skeleton)}


def source_tags(manifest: Manifest) -> list[list[str | None]]:
    """Per adapter, a tag of each object it is collected from (its config, weights and data; None: missing). They
    change when an object is replaced in place, which the manifest's own bytes do not show."""
    tags = []
    for spec in manifest.adapters + manifest.baselines:
        store = open_store(spec.uri)
        data = [split_uri(uri) for uri in (spec.data or {}).values()]
        tags.append([store.tag(CONFIG_FILE), store.tag(WEIGHTS_FILE)] + [open_store(parent).tag(key) for parent, key in data])
    return tags


def fetch_adapter(spec: AdapterSpec, base_config: dict) -> Collected:
    """Fetch and check one adapter and its data. Errors become Collected.error (naming the adapter)."""
    try:
        return _fetch(spec, base_config)
    except (ValueError, StoreError) as err:
        message = str(err)
        return Collected(spec.name, error=message if f"'{spec.name}'" in message else f"adapter '{spec.name}': {message}")


def _fetch(spec: AdapterSpec, base_config: dict) -> Collected:
    store = open_store(spec.uri)
    if not store.exists(WEIGHTS_FILE) and store.exists(PICKLE_WEIGHTS_FILE):
        raise pickle_only_error(spec.name)
    config_bytes, weights = store.read_bytes(CONFIG_FILE), store.read_bytes(WEIGHTS_FILE)
    sha = hashlib.sha256(weights).hexdigest()
    if spec.sha256 and spec.sha256 != sha:
        raise ValueError(f"sha256 of {WEIGHTS_FILE} is {sha}, the manifest says {spec.sha256}")
    adapter = adapter_from_bytes(spec.name, spec.uri, config_bytes, weights)
    adapter.validate_against(skeleton_from_config(base_config))
    config_sha = hashlib.sha256(config_bytes).hexdigest()
    content_sha = hashlib.sha256(f"{config_sha}:{sha}".encode()).hexdigest()  # same weights, other alpha: another adapter
    files = {adapter_key(content_sha, CONFIG_FILE): config_bytes, adapter_key(content_sha, WEIGHTS_FILE): weights}
    data = {}
    for split, uri in (spec.data or {}).items():
        content = read_uri(uri)
        read_samples(content, f"{split} data {uri}")
        data[split] = hashlib.sha256(content).hexdigest()
        files[data_key(data[split])] = content
    entry = {"sha256": sha, "config_sha256": config_sha, "content_sha256": content_sha, "rank": adapter.rank, "alpha": adapter.alpha, "target_modules": adapter.target_modules,
             "description": spec.description, "data": data, "metric": spec.metric, "prompt_format": spec.prompt_format,
             "source_uri": spec.uri}
    return Collected(spec.name, entry=entry, files=files)


def read_samples(content: bytes, where: str) -> list[dict]:
    """The samples of task data (JSONL): every line a JSON object with non-empty strings "prompt" and "response"
    (blank lines are not allowed). ValueError naming `where` and the line otherwise."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where} is not UTF-8 text (byte {err.start})") from None
    lines = [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")] if text else []
    if not lines:  # lines end at "\n" only: JSON strings may hold U+2028 and the like unescaped
        raise ValueError(f"{where} is empty")
    samples = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: line {number} is not valid JSON ({err.msg})") from None
        if not (isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str)):
            raise ValueError(f"{where}: line {number} needs string fields 'prompt' and 'response'")
        if not (record["prompt"] and record["response"]):
            raise ValueError(f"{where}: line {number} has an empty 'prompt' or 'response'")
        samples.append(record)
    return samples


def plan_index(registry: Registry, base: dict, results: list[Collected],
               baselines: list[Collected] = ()) -> tuple[dict | None, list[dict]]:
    """The new index (None when anything is rejected: then nothing may change) and one summary row per adapter
    and per baseline (named "<name> (baseline)")."""
    held = registry.base_model
    if held is not None and held["fingerprint"] != base["fingerprint"]:
        reason = f"the registry holds adapters for base model '{held['name']}' ({held['fingerprint']}), not this one"
        return None, [{"name": r.name, "status": "rejected", "detail": reason} for r in [*results, *baselines]]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    adapters, rows = _merged(registry.index["adapters"], results, now, "")
    kept_baselines, baseline_rows = _merged(registry.index.get("baselines", {}), baselines, now, " (baseline)")
    rows += baseline_rows
    if any(row["status"] == "rejected" for row in rows):  # nothing is committed: say what would have happened
        return None, [row if row["status"] == "rejected" else
                      {**row, "status": "not committed", "detail": f"would be {row['status']} ({row['detail']})"}
                      for row in rows]
    index = {**registry.index, "base_model": held or base, "adapters": adapters}
    return (index | {"baselines": kept_baselines}) if kept_baselines else index, rows


def _merged(entries: dict, results: list[Collected], now: str, label: str) -> tuple[dict, list[dict]]:
    """The entries with each accepted result merged in, and a row per result."""
    merged, rows = dict(entries), []
    for result in results:
        if result.error is not None:
            rows.append({"name": result.name + label, "status": "rejected", "detail": result.error})
            continue
        status, merged[result.name] = _merge(merged.get(result.name), result.entry, now)
        rows.append({"name": result.name + label, "status": status, "detail": result.entry["sha256"][:12]})
    return merged, rows


def _merge(old: dict | None, new: dict, now: str) -> tuple[str, dict]:
    if old is None:
        return "added", {**new, "registered_at": now, "version": 1}
    same_content = old["content_sha256"] == new["content_sha256"] and old.get("data") == new["data"]
    if same_content and all(old.get(k) == new[k] for k in METADATA):
        return "unchanged", old
    if same_content:
        return "updated", {**old, **{k: new[k] for k in METADATA}}
    previous = old.get("previous", []) + [{"sha256": old["sha256"], "version": old["version"],
                                           "registered_at": old["registered_at"]}]
    return "new version", {**new, "registered_at": now, "version": old["version"] + 1, "previous": previous}
