"""Where adapters live: the YAML manifest that lists them, and the registry they are collected into.

    manifest.py    the manifest, parsed and checked once into a typed Manifest
    registry.py    the registry: registry.json + content-addressed adapters and task data, in any object store
    collection.py  fetch-and-check of one adapter, and the plan of a registry's next index (no scheduling:
                   pipelines/collect_adapters.py runs it on Ray)
"""
from .collection import Collected, fetch_adapter, inspect_base, plan_index, read_samples, source_tags
from .manifest import API_VERSION, DATA_SPLITS, KIND, METRICS, AdapterSpec, Manifest, load_manifest
from .registry import Registry

__all__ = ["API_VERSION", "AdapterSpec", "Collected", "DATA_SPLITS", "KIND", "METRICS", "Manifest", "Registry",
           "fetch_adapter", "inspect_base", "load_manifest", "plan_index", "read_samples", "source_tags"]
