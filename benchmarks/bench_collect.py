"""Collecting 32 adapters from a loopback S3 (SeaweedFS, pipelines/local_s3.py): Ray's parallel fetch vs one by one.

Variants, interleaved per repeat, each into a fresh local registry:
  ray_parallel   pipelines/collect_adapters.collect(parallel=8): Ray tasks fetch and check 8 adapters at once
  ray_serial     the same pipeline with parallel=1
  one_by_one     a plain loop in the driver: fetch_adapter for each adapter, then the same upload and commit
Medians of the repeats with warm Ray workers (a long-lived cluster's steady state: idle workers are kept);
the first, cold run (workers starting and importing torch) is reported on its own. Ratio = one_by_one / ray_parallel.

    python benchmarks/bench_collect.py [--adapters 32] [--repeats 3] [--out benchmarks/results/collect_loopback_s3.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import boto3
import ray
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from meteora_moe.registry import Manifest, Registry, load_manifest
from meteora_moe.registry import fetch_adapter, inspect_base, plan_index

ROOT = Path(__file__).parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the pipelines and the tests' tiny-model helpers
from pipelines.collect_adapters import collect  # noqa: E402
from pipelines.local_s3 import LocalS3  # noqa: E402
from tiny import ALL_MODULES, make_adapter  # noqa: E402


def one_by_one(manifest: Manifest, registry_uri: str) -> None:
    config, base = inspect_base(manifest)
    registry = Registry(registry_uri)
    results = [fetch_adapter(spec, config) for spec in manifest.adapters]
    index, rows = plan_index(registry, base, results)
    assert index is not None, rows  # something was rejected: nothing to commit
    for result in results:
        for key, data in result.files.items():
            registry.store.write_bytes(key, data)
    registry.commit(index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/collect_loopback_s3.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    server = LocalS3(work / "s3").start()
    os.environ.update(server.env)
    try:
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="bench")
        base = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                            num_attention_heads=8, num_key_value_heads=8))
        base.save_pretrained(work / "base")
        for file in (work / "base").iterdir():
            s3.upload_file(str(file), "bench", f"base/{file.name}")
        entries, adapter_bytes = [], 0
        for i in range(args.adapters):
            path = make_adapter(base, work / f"a{i:02d}", rank=16, alpha=32, targets=ALL_MODULES, seed=i)
            for file in path.iterdir():
                s3.upload_file(str(file), "bench", f"adapters/a{i:02d}/{file.name}")
                adapter_bytes += file.stat().st_size
            s3.put_object(Bucket="bench", Key=f"data/a{i:02d}.jsonl", Body=b'{"prompt": "p", "response": "r"}\n' * 1000)
            entries.append({"name": f"a{i:02d}", "uri": f"s3://bench/adapters/a{i:02d}/",
                            "data": {"train": f"s3://bench/data/a{i:02d}.jsonl"}})
        (work / "manifest.yaml").write_text(yaml.safe_dump({"apiVersion": "meteora/v1", "kind": "AdapterManifest",
                                                            "base_model": {"name": "bench-base", "uri": "s3://bench/base/"},
                                                            "adapters": entries}))
        manifest = load_manifest(work / "manifest.yaml")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 _system_config={"idle_worker_killing_time_threshold_ms": 600_000})
        variants = {"ray_parallel": lambda r: collect(manifest, r, parallel=8),
                    "ray_serial": lambda r: collect(manifest, r, parallel=1),
                    "one_by_one": lambda r: one_by_one(manifest, r)}
        start = time.perf_counter()
        variants["ray_parallel"](str(work / "cold"))  # starts the task workers
        cold = time.perf_counter() - start
        seconds = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name, run in variants.items():
                registry = work / f"{name}-{repeat}"
                start = time.perf_counter()
                run(str(registry))
                seconds[name].append(time.perf_counter() - start)
                assert len(Registry(registry).names) == args.adapters
            print(f"repeat {repeat + 1}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in seconds.items()), file=sys.stderr)
        medians = {name: statistics.median(s) for name, s in seconds.items()}
        result = {
            "command": "python " + " ".join(sys.argv),
            "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                        "s3": "SeaweedFS (weed mini) on 127.0.0.1, its own process group"},
            "adapters": args.adapters, "adapter_bytes_total": adapter_bytes,
            "seconds_median": medians, "seconds": seconds, "ray_parallel_cold_first_run_seconds": cold,
            "ratio_one_by_one_over_ray_parallel": medians["one_by_one"] / medians["ray_parallel"],
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps({k: result[k] for k in ("seconds_median", "ratio_one_by_one_over_ray_parallel")}, indent=2))
    finally:
        ray.shutdown()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
