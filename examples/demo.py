"""`make demo`: the whole system on this machine, from adapters in an object store to an endpoint on Ray Serve.

  1. assets     build the benchmark suite (base model, one PEFT adapter per task, baselines, data; cached):
                smollm2-demo (the default: the real SmolLM2-135M-Instruct, offline from PyPI, 6 chattasks adapters
                trained on its chat template), smollm2 (all 12 chattasks adapters) or tinytasks (a tiny model
                trained here, character-level tasks)
  2. publish    copy them into the embedded object store (a local directory; --s3: SeaweedFS on loopback started
                here) with two manifests: demo.yaml (the first tasks) and more.yaml (the same + 2 more tasks)
  3. cluster    a local Ray head (pipelines/local_cluster.py: free ports, its own process group)
  4. workflow   pipelines/workflow.py on demo.yaml: collect -> fit the gates (2 Ray Train workers) -> deploy on
                Ray Serve -> evaluate; the table per task and on composites, and the plots
  5. ask        a composite prompt through the OpenAI-compatible endpoint, its answer routed token by token
  6. grow       the workflow on more.yaml while a client keeps asking a new task's question: the 2 new adapters
                registered, only their gate rows fitted, the application redeployed in place; the seconds until
                an answer is routed to a new expert, failures counted; the new tasks evaluated
  7. shut down  Serve, the Ray head's process group, the S3 server: everything started here, nothing else

    python examples/demo.py [--model smollm2-demo|smollm2|tinytasks] [--out demo-output] [--s3] [--eval-samples N]
                            [workflow settings, dotted: train.method=sgd train.steps=300 ...]
smollm2-demo: about 9 minutes for the first asset build on 2 cores, then about 8 minutes per run (README).
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "token")  # the local cluster uses token auth; read when ray is imported
import ray  # noqa: E402
import yaml  # noqa: E402

from meteora_moe.evaluation import composite_problems, load_benchmark, markdown_table  # noqa: E402
from meteora_moe.registry import Registry, load_manifest  # noqa: E402
from meteora_moe.store import open_store  # noqa: E402
from pipelines import local_cluster  # noqa: E402
from pipelines.local_s3 import LocalS3  # noqa: E402
from pipelines.ray_env import LOCAL_RAY  # noqa: E402
from pipelines.workflow import StageFailed, load_workflow_config, run  # noqa: E402
from client import keep_asking, new_question  # noqa: E402


@dataclass(frozen=True)
class Suite:
    build: Callable[[], str]  # -> the built manifest's URI
    first: int  # adapters in demo.yaml; more.yaml has them all
    settings: tuple[str, ...]  # workflow settings besides the demo's own


def tinytasks() -> str:
    from suites.tinytasks import build

    return build()


def chattasks() -> str:
    from suites.chattasks import build

    return build()


def chattasks_demo() -> str:
    from suites.chattasks import DEMO, build

    return build(config=DEMO)


# half of the fit's calibration items composites: composite-3 2.35 of 3 on the demo suite against 1.83 with a
# quarter (bench-real's), the showcase answered right (benchmarks/results/gate_fit/composites.md)
CHAT = ("train.precision=fast", "train.composite_fraction=0.5")
SUITES = {
    "smollm2-demo": Suite(chattasks_demo, 4, (*CHAT, "evaluate.composite=[3]", "evaluate.composite_count=10")),
    "smollm2": Suite(chattasks, 10, (*CHAT, "evaluate.composite=[3, 5, 10]", "evaluate.composite_count=10",
                                     "evaluate.composite_temperature=2")),
    "tinytasks": Suite(tinytasks, 6, ("evaluate.composite=[3, 5]", "evaluate.composite_count=16")),
}


def step(number: int, title: str) -> float:
    print(f"\n=== {number}. {title}", flush=True)
    return time.perf_counter()


def done(started: float, result: str) -> None:
    print(f"--> {result} ({time.perf_counter() - started:.0f} s)", flush=True)


def publish(build_manifest: Path, store_uri: str, first: int) -> tuple[str, str]:
    """Copy the built assets into the object store; write demo.yaml (the first tasks) and more.yaml (all) there."""
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
    for baseline in manifest["baselines"]:
        baseline["uri"] = moved(baseline["uri"])
    uris = []
    for name, count in (("demo.yaml", first), ("more.yaml", len(manifest["adapters"]))):
        subset = {**manifest, "adapters": manifest["adapters"][:count]}
        store.write_bytes(name, yaml.safe_dump(subset, sort_keys=False).encode())
        uris.append(f"{store_uri.rstrip('/')}/{name}")
    return uris[0], uris[1]


def start_s3(data_dir: Path) -> LocalS3:
    """SeaweedFS on loopback (pipelines/local_s3.py), its settings in this process's environment, which the Ray
    cluster started after it inherits; a bucket for the demo."""
    server = LocalS3(data_dir).start()
    os.environ.update(server.env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="meteora-demo")
    return server


def show_evaluation(outputs: dict) -> dict:
    results = json.loads((Path(outputs["evaluate"].out_dir) / "results.json").read_text())
    print(markdown_table(results["per_task"], results["composite"]))
    print(f"plots: {outputs['evaluate'].out_dir}/accuracy.png, routing.png")
    return results


def ask_composite(url: str, registry: Registry, tasks: list[str]) -> None:
    """One composite prompt (3 tasks) through the OpenAI-compatible endpoint, with its routing per token: as a raw
    completion in the plain format, as a user message in the chat format."""
    from openai import OpenAI

    bench = load_benchmark(registry, tasks, samples=8)
    problem = composite_problems(bench.eval_sets, 3, 1, bench.fmt, seed=3)[0]
    client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("METEORA_API_KEY", "none"))
    options = {"model": "meteora", "max_tokens": 64, "temperature": 0, "extra_body": {"return_routing": True}}
    if bench.fmt.name == "chat":
        choice = client.chat.completions.create(messages=[{"role": "user", "content": problem.joined.prompt}], **options).choices[0]
        text = choice.message.content
    else:
        choice = client.completions.create(prompt=problem.joined.prompt, **options).choices[0]
        text = choice.text
    print(f"prompt ({', '.join(problem.tasks)}):\n{problem.joined.prompt}\nanswer:\n{text}\nexpected:\n{problem.joined.response}")
    print("routing per generated token (heaviest expert, mean weight over the adapted layers):")
    print("  " + "  ".join(f"{step['token']!r}:{next(iter(step['experts']), '-')}" for step in choice.routing))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SUITES), default="smollm2-demo")
    parser.add_argument("--out", default="demo-output")
    parser.add_argument("--s3", action="store_true", help="the object store is a loopback S3 server (SeaweedFS) started here")
    parser.add_argument("--eval-samples", type=int, default=30, help="eval samples per task")
    parser.add_argument("setting", nargs="*", help="more workflow settings (configs/workflow.yaml keys, dotted)")
    args = parser.parse_args()
    suite = SUITES[args.model]
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # each demo starts from nothing but the cached assets
    out.mkdir(parents=True)
    began, s3, cluster_dir = time.perf_counter(), None, out / "ray-cluster"
    try:
        started = step(1, f"assets: the {args.model} benchmark suite (cached after the first build)")
        built = Path(suite.build())
        done(started, f"{built.parent}")

        started = step(2, "publish the assets and two manifests to the object store")
        if args.s3:
            s3 = start_s3(out / "s3")
        store_uri = "s3://meteora-demo/store" if args.s3 else str(out / "store")
        demo_manifest, more_manifest = publish(built, store_uri, suite.first)
        done(started, f"{demo_manifest} ({suite.first} adapters), {more_manifest} (all)")

        started = step(3, "a local Ray cluster")
        cluster = local_cluster.up(cluster_dir, num_cpus=2)
        # stage lines and tables only: the workers' and Ray Train's output stays in the cluster's log files
        ray.init(address=cluster["gcs_address"], logging_config=LOCAL_RAY["logging_config"], log_to_driver=False)
        port = local_cluster.free_ports(1)[0]
        url = f"http://127.0.0.1:{port}"
        settings = [f"registry={store_uri}/registry", f"work_dir={out}", "train.cpus_per_worker=0.5",
                    f"evaluate.samples={args.eval_samples}", *suite.settings, f"deploy.http_port={port}",
                    "deploy.deployment={ray_actor_options: {num_cpus: 0.5}, num_replicas: 1, max_surge_percent: 100, "
                    "logging_config: {log_level: WARNING}}", *args.setting]
        config = load_workflow_config(None, settings)
        done(started, f"Ray at {cluster['gcs_address']}; Serve will listen on {url}")

        started = step(4, f"workflow on {demo_manifest}")
        first = run(load_manifest(demo_manifest), config, can_deploy=True)
        show_evaluation(first)
        done(started, f"{suite.first} adapters fused, trained, evaluated and serving at {url}")

        started = step(5, "a composite prompt through the OpenAI-compatible endpoint")
        ask_composite(url, Registry(config.registry), load_manifest(demo_manifest).names)
        done(started, "answered")

        started = step(6, f"register 2 more adapters: workflow on {more_manifest}, redeploying in place under load")
        grown = load_manifest(more_manifest)
        new = [name for name in grown.names if name not in load_manifest(demo_manifest).names]
        expert, question = new_question(grown, new[0])
        print(f"a client keeps asking {expert}'s question {question['messages'][0]['content']!r}", flush=True)
        stop, outcomes = threading.Event(), []
        client = threading.Thread(target=keep_asking, args=(url, question, expert, stop, outcomes))
        client.start()
        try:  # the client asks while the new adapters are registered and deployed
            run(grown, load_workflow_config(None, [*settings, "evaluate.enabled=false"]), can_deploy=True)
        finally:
            stop.set()
            client.join()
        # then only the new tasks are evaluated (the old ones were, and their gate rows are as they were)
        second = run(grown, load_workflow_config(None, [*settings, f"evaluate.tasks={new}"]), can_deploy=True)
        results = show_evaluation(second)
        print(f"incremental training: {second['train'].train_seconds} s (the first: {first['train'].train_seconds} s)")
        (out / "checkpoint").symlink_to(second["train"].checkpoint)  # what `serve run configs/serve.yaml` serves
        failed = sum(not ok for _, ok, _ in outcomes)
        routed = next((round(at) for at, _, to_new in outcomes if to_new), None)
        summary = {"seconds": round(time.perf_counter() - began), "redeploy_requests": len(outcomes),
                   "redeploy_failed": failed, "first_routed_to_new_expert_s": routed, "results": results,
                   **{name: {stage: dataclasses.asdict(out) for stage, out in outputs.items()}
                      for name, outputs in (("first", first), ("second", second))}}
        (out / "demo_results.json").write_text(json.dumps(summary, indent=2, default=str))
        done(started, f"redeploy in place: {len(outcomes)} requests during the update, {failed} failed; the first answer "
                      f"routed to {expert} {routed} s after the workflow started")
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
