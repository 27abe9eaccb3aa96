"""Collect the adapters of a YAML manifest into a registry, with Ray tasks fetching and checking in parallel.

    python pipelines/collect_adapters.py --manifest M --registry R [--parallel 8]
    python pipelines/collect_adapters.py --registry R --list
    python pipelines/collect_adapters.py --registry R --remove NAME [NAME ...]

1. parse the manifest and read the base model's config (no weights) -> a skeleton to check shapes against
2. Ray tasks: fetch each adapter and its task data, and each baseline, check them (safetensors only, sha256,
   shapes, JSONL)
3. if anything was rejected: print why, exit 1, and leave the registry byte-for-byte as it was
4. otherwise Ray tasks upload the new content-addressed objects, then ONE atomic write of registry.json
Registering again with identical content is a no-op; changed content under a name is a new version;
--remove drops names from the index in one compare-and-swap commit (a workflow on a manifest without them
drops their gate rows). Runs on the cluster of RAY_ADDRESS (or under `ray job submit`), else on a local Ray.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # `python pipelines/collect_adapters.py` from anywhere

import ray  # noqa: E402
from tqdm import tqdm  # noqa: E402

from meteora_moe import ManifestError, RegistryError, StoreError  # noqa: E402
from meteora_moe.registry import Collected, Manifest, Registry, fetch_adapter, inspect_base, load_manifest, plan_index  # noqa: E402
from meteora_moe.store import absolute_uri, open_store  # noqa: E402
from pipelines.ray_env import ray_connection, runtime_env, where_readable  # noqa: E402

log = logging.getLogger("collect_adapters")
TASK_CPUS = 0.5  # fetching is mostly I/O: two tasks share a core (each worker pays one torch import to start)


@dataclass
class Outcome:
    rows: list[dict]  # {name, status, detail} per adapter, then per baseline
    committed: bool

    @property
    def exit_code(self) -> int:
        return 0 if self.committed else 1  # not committed = something was rejected


@ray.remote(num_cpus=TASK_CPUS, num_returns=2)
def _fetch(spec, base_config) -> tuple[Collected, dict[str, bytes]]:
    collected = fetch_adapter(spec, base_config)
    files, collected.files = collected.files, {}
    return collected, files  # the files stay in Ray's object store until the upload tasks need them


@ray.remote(num_cpus=TASK_CPUS)
def _upload(registry_uri: str, files: dict[str, bytes]) -> int:
    store = open_store(registry_uri)
    missing = {key: data for key, data in files.items() if not store.exists(key)}
    for key, data in missing.items():
        store.write_bytes(key, data)
    return len(missing)


def collect(manifest: Manifest, registry_uri: str, parallel: int = 8, on_fetched=None) -> Outcome:
    """Run the collection (the manifest's adapters, then its baselines) on the connected Ray. `on_fetched(collected)`
    is called as each one's check completes."""
    base_config, base = inspect_base(manifest)
    registry_uri = absolute_uri(registry_uri)  # the upload tasks may run in another directory
    registry = Registry(registry_uri)
    keys = [("adapter", spec.name) for spec in manifest.adapters] + [("baseline", spec.name) for spec in manifest.baselines]
    results, files = {}, {}
    pending, queue = {}, list(zip(keys, manifest.adapters + manifest.baselines))
    with tqdm(total=len(queue), desc="fetching and checking adapters", unit="adapter", disable=None) as bar:
        while queue or pending:
            while queue and len(pending) < parallel:
                key, spec = queue.pop(0)
                fetch = _fetch.options(runtime_env=runtime_env(), **where_readable(spec.uri, *(spec.data or {}).values()))
                report, payload = fetch.remote(spec, base_config)
                pending[report] = (key, payload)
            done, _ = ray.wait(list(pending), num_returns=1)
            key, files[key] = pending.pop(done[0])
            results[key] = ray.get(done[0])
            bar.update(1)
            if on_fetched is not None:
                on_fetched(results[key])
    index, rows = plan_index(registry, base, [results[k] for k in keys if k[0] == "adapter"],
                             [results[k] for k in keys if k[0] == "baseline"])
    if index is None:
        return Outcome(rows, committed=False)
    changed = [key for key, row in zip(keys, rows) if row["status"] in ("added", "new version")]  # rows follow keys
    upload = _upload.options(runtime_env=runtime_env(), **where_readable(registry_uri))
    ray.get([upload.remote(registry_uri, files[key]) for key in changed])
    if index != registry.index:
        registry.commit(index)
    return Outcome(rows, committed=True)


def collected(manifest: Manifest, registry_uri: str) -> Registry:
    """The manifest collected into the registry on the connected Ray (or a local one started for it): a no-op when
    nothing changed. RegistryError, after the table of why, when anything is rejected."""
    with ray_connection():
        outcome = collect(manifest, registry_uri)
    if not outcome.committed:
        print_summary(outcome.rows)
        raise RegistryError(f"{manifest.path} could not be collected into {registry_uri} (the table above says why)")
    return Registry(registry_uri)


def print_summary(rows: list[dict]) -> None:
    width = max([len(r["name"]) for r in rows] + [7])
    print(f"{'adapter':<{width}}  {'status':<12} detail")
    for row in rows:
        print(f"{row['name']:<{width}}  {row['status']:<12} {row['detail']}")


def print_registry(registry: Registry) -> None:
    base = registry.base_model
    print(f"registry {registry.uri}: base model {base['name'] if base else '(none yet)'}")
    rows = [{"name": name + kind, "status": f"v{e['version']} r={e['rank']}",
             "detail": f"{e['sha256'][:12]} {','.join(e['target_modules'])} {e['description']}"}
            for kind, entries in (("", registry.index["adapters"]), (" (baseline)", registry.index.get("baselines", {})))
            for name, e in entries.items()]
    if rows:
        print_summary(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", help="the adapter manifest (YAML)")
    parser.add_argument("--registry", required=True, help="registry directory or s3://bucket/prefix")
    parser.add_argument("--list", action="store_true", help="list what the registry holds and exit")
    parser.add_argument("--remove", nargs="+", metavar="NAME", help="drop these adapters from the registry and exit")
    parser.add_argument("--parallel", type=int, default=8, help="adapters fetched at once")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.list or args.remove:
            registry = Registry(args.registry)
            if args.remove:
                registry.remove(args.remove)
            print_registry(registry)
            return 0
        if not args.manifest:
            parser.error("--manifest is required (or --list, --remove)")
        manifest = load_manifest(args.manifest)
        with ray_connection():
            outcome = collect(manifest, args.registry, parallel=max(1, args.parallel))
    except (ManifestError, RegistryError, ValueError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(outcome.rows)
    if outcome.exit_code:
        print("nothing was registered: fix the rejected adapters and run again", file=sys.stderr)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
