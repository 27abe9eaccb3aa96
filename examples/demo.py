"""`make demo`: the whole system on this machine, from adapters in an object store to an autoscaled endpoint.

  1. assets     build the tinytasks benchmark (tiny base, one PEFT adapter per task, baselines, data; cached)
  2. publish    copy them into the embedded object store (a local directory; --s3: a loopback S3 server started
                here) with two manifests: demo.yaml (6 tasks) and more.yaml (the same + 2 more tasks)
  3. cluster    a local Ray head (pipelines/local_cluster.py: free ports, its own process group)
  4. workflow   pipelines/workflow.py on demo.yaml: collect -> train the gates (2 Ray Train workers) -> evaluate
                -> deploy on Ray Serve; the table per task and on composites, and the plots
  5. ask        a composite prompt through the OpenAI-compatible endpoint, its answer routed token by token
  6. grow       the workflow on more.yaml: the 2 new adapters registered, the gates trained incrementally, the
                application redeployed in place while a client keeps sending requests (failures counted)
  7. shut down  Serve, the Ray head's process group, the S3 server: everything started here, nothing else

    python examples/demo.py [--out demo-output] [--s3] [--steps 1000] [--eval-samples 30] [--composites 16]
About 12 minutes for the first asset build on 2 cores, then about 4 minutes per run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "token")  # the local cluster uses token auth; read when ray is imported
import httpx  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402

from meteora.evaluation import composite_problems, load_benchmark, markdown_table  # noqa: E402
from meteora.registry import Manifest, load_manifest  # noqa: E402
from meteora.store import open_store  # noqa: E402
from pipelines import local_cluster  # noqa: E402
from pipelines.common import LOCAL_RAY  # noqa: E402
from pipelines.workflow import StageFailed, load_workflow_config, run  # noqa: E402
from suites.tinytasks import DEFAULT_TASKS, build  # noqa: E402

FIRST_TASKS = DEFAULT_TASKS[:6]  # demo.yaml; more.yaml adds the last two


def step(number: int, title: str) -> float:
    print(f"\n=== {number}. {title}", flush=True)
    return time.perf_counter()


def done(started: float, result: str) -> None:
    print(f"--> {result} ({time.perf_counter() - started:.0f} s)", flush=True)


def publish(build_manifest: Path, store_uri: str) -> tuple[str, str]:
    """Copy the built assets into the object store; write demo.yaml (6 tasks) and more.yaml (8) there."""
    store, source = open_store(store_uri), build_manifest.parent
    files = [p for p in source.rglob("*") if p.is_file() and p.suffix != ".yaml" and p.name != "build_report.json"]
    for path in files:
        store.write_bytes(path.relative_to(source).as_posix(), path.read_bytes())
    manifest = yaml.safe_load(build_manifest.read_text())

    def moved(uri: str) -> str:  # every URI of the build's manifest lies under the build's directory
        return store_uri.rstrip("/") + uri.removeprefix(str(source))

    manifest["base_model"]["uri"] = moved(manifest["base_model"]["uri"])
    for adapter in manifest["adapters"]:
        adapter["uri"] = moved(adapter["uri"])
        adapter["data"] = {split: moved(uri) for split, uri in adapter["data"].items()}
    uris = []
    for name, tasks in (("demo.yaml", FIRST_TASKS), ("more.yaml", DEFAULT_TASKS)):
        subset = {**manifest, "adapters": [a for a in manifest["adapters"] if a["name"] in tasks]}
        store.write_bytes(name, yaml.safe_dump(subset, sort_keys=False).encode())
        uris.append(f"{store_uri.rstrip('/')}/{name}")
    return uris[0], uris[1]


def start_s3() -> tuple[object, dict]:
    from moto.server import ThreadedMotoServer

    port = local_cluster.free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="meteora-demo")
    return server, env


def show_evaluation(outputs: dict) -> dict:
    results = json.loads((Path(outputs["evaluate"].out_dir) / "results.json").read_text())
    print(markdown_table(results["per_task"], results["composite"]))
    print(f"plots: {outputs['evaluate'].out_dir}/accuracy.png, routing.png")
    return results


def ask_composite(url: str, manifest: Manifest) -> None:
    """One composite prompt (3 tasks) through the OpenAI-compatible endpoint, with its routing per token."""
    from openai import OpenAI

    bench = load_benchmark(manifest, samples=8)
    tasks, sample = composite_problems(bench.eval_sets, 3, 1, seed=3)[0]
    client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("METEORA_API_KEY", "none"))
    out = client.completions.create(model="meteora", prompt=sample["prompt"], max_tokens=48, temperature=0,
                                    extra_body={"return_routing": True})
    choice = out.choices[0]
    print(f"prompt ({', '.join(tasks)}):\n{sample['prompt']}answer:\n{choice.text}\nexpected:\n{sample['response']}")
    print("routing per generated token (heaviest expert, mean weight over the adapted layers):")
    print("  " + "  ".join(f"{step['token']!r}:{next(iter(step['experts']), '-')}" for step in choice.routing))


def keep_asking(url: str, stop: threading.Event, outcomes: list) -> None:
    """A client sending completions back to back (during the redeploy)."""
    while not stop.is_set():
        try:
            r = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": "meteora", "prompt": "reverse: abcd\n", "max_tokens": 8, "temperature": 0})
            outcomes.append(r.status_code == 200)
        except httpx.HTTPError:
            outcomes.append(False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-output")
    parser.add_argument("--s3", action="store_true", help="the object store is a loopback S3 server (moto) started here")
    parser.add_argument("--steps", type=int, default=1000, help="gate-training steps (the increment trains 30%% of them)")
    parser.add_argument("--eval-samples", type=int, default=30, help="eval samples per task")
    parser.add_argument("--composites", type=int, default=16, help="composite prompts per size (3 and 5)")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # each demo starts from nothing but the cached assets
    out.mkdir(parents=True)
    began, s3, cluster_dir = time.perf_counter(), None, out / "ray-cluster"
    try:
        started = step(1, "assets: the tinytasks benchmark (cached after the first build)")
        built = Path(build())
        done(started, f"{built.parent}")

        started = step(2, "publish the assets and two manifests to the object store")
        if args.s3:
            s3, _ = start_s3()
        store_uri = "s3://meteora-demo/store" if args.s3 else str(out / "store")
        demo_manifest, more_manifest = publish(built, store_uri)
        done(started, f"{demo_manifest} ({len(FIRST_TASKS)} adapters), {more_manifest} ({len(DEFAULT_TASKS)})")

        started = step(3, "a local Ray cluster")
        cluster = local_cluster.up(cluster_dir, num_cpus=2)
        ray.init(address=cluster["gcs_address"], logging_config=LOCAL_RAY["logging_config"])  # progress lines only
        port = local_cluster.free_ports(1)[0]
        url = f"http://127.0.0.1:{port}"
        config = load_workflow_config(None, [f"registry={store_uri}/registry", f"work_dir={out}", f"train.steps={args.steps}",
                                    "train.cpus_per_worker=0.5", f"evaluate.samples={args.eval_samples}", f"evaluate.composite_count={args.composites}",
                                    f"deploy.http_port={port}", "deploy.deployment={ray_actor_options: {num_cpus: 0.5}, "
                                    "num_replicas: 1, max_surge_percent: 100, logging_config: {log_level: WARNING}}"])
        done(started, f"Ray at {cluster['gcs_address']}; Serve will listen on {url}")

        started = step(4, f"workflow on {demo_manifest}")
        first = run(load_manifest(demo_manifest), config, can_deploy=True)
        show_evaluation(first)
        done(started, f"{len(FIRST_TASKS)} adapters fused, trained, evaluated and serving at {url}")

        started = step(5, "a composite prompt through the OpenAI-compatible endpoint")
        ask_composite(url, load_manifest(demo_manifest))
        done(started, "answered")

        started = step(6, f"register 2 more adapters: workflow on {more_manifest}, redeploying in place under load")
        stop, outcomes = threading.Event(), []
        client = threading.Thread(target=keep_asking, args=(url, stop, outcomes))
        client.start()
        try:
            second = run(load_manifest(more_manifest), config, can_deploy=True)
        finally:
            stop.set()
            client.join()
        results = show_evaluation(second)
        print(f"incremental training: {second['train'].train_seconds} s (the first: {first['train'].train_seconds} s)")
        (out / "checkpoint").symlink_to(second["train"].checkpoint)  # what `serve run configs/serve.yaml` serves
        failed = outcomes.count(False)
        summary = {"seconds": round(time.perf_counter() - began), "redeploy_requests": len(outcomes),
                   "redeploy_failed": failed, "results": results,
                   **{name: {stage: dataclasses.asdict(out) for stage, out in outputs.items()}
                      for name, outputs in (("first", first), ("second", second))}}
        (out / "demo_results.json").write_text(json.dumps(summary, indent=2, default=str))
        done(started, f"redeploy in place: {len(outcomes)} requests during the update, {failed} failed")
    except StageFailed as error:
        print(f"\ndemo failed: {error}", file=sys.stderr)
        return 1
    finally:
        started = step(7, "shut down everything this demo started")
        ray.shutdown()
        stopped = local_cluster.down(cluster_dir)  # Serve, its replicas and every Ray process of this cluster
        if s3 is not None:
            s3.stop()
        done(started, f"Ray cluster {'stopped' if stopped else 'was not running'}" + (", S3 server stopped" if s3 else ""))
    print(f"\ndemo finished in {time.perf_counter() - began:.0f} s; results in {out}/demo_results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
