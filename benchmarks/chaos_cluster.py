"""`make chaos`: the whole workflow on a 3-node loopback cluster with SeaweedFS as its only shared store, losing a
worker node during gate training and another during serving; then the same workflow undisturbed, to compare.

1. SeaweedFS on loopback; the suite's assets and manifest published to it (examples/demo.py's publish)
2. a head on 127.0.0.2 (1 CPU) and worker nodes on .3 and .4 (2 CPUs each), each its own raylet, object store,
   HOME and cache (pipelines/local_cluster.py); node death noticed after 3 s of failed health checks
3. `ray job submit --working-dir . -- python pipelines/workflow.py --manifest s3://...`, every URI on S3: the
   fit, then SGD with checkpoints on S3, 2 Train workers strictly spread; once a checkpoint after the fit is
   registered, the node of a Train worker is SIGKILLed and a replacement node joins; then deployed, 2 replicas
   on 2 nodes behind the head's proxy
4. clients ask through the endpoint (the official openai client, with its default retries and with none) while
   the node of a replica is SIGKILLed; a replacement node joins; the seconds until 2 replicas serve again
5. the same workflow into another prefix with nothing killed (and nothing deployed): registry, checkpoint and
   gates compared
Writes benchmarks/results/cluster/chaos.json (command, machine, every number) and chaos.md; stops everything.

    python benchmarks/chaos_cluster.py [--model smollm2-demo|tinytasks] [--steps 12] [--work /tmp/meteora-chaos]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "examples")]
import boto3  # noqa: E402
import httpx  # noqa: E402
import openai  # noqa: E402
import torch  # noqa: E402

from bench_mixture import machine  # noqa: E402
from demo import SUITES, publish  # noqa: E402
from meteora_moe import MeteoraModel  # noqa: E402
from meteora_moe.registry import Registry  # noqa: E402
from pipelines import local_cluster  # noqa: E402
from pipelines.local_s3 import LocalS3  # noqa: E402

BIN = Path(sys.executable).parent
BUCKET = "chaos"
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
REPLICA = "ServeReplica:meteora:MeteoraServer"


class Cluster:
    """The state API and the node controls of one local cluster."""

    def __init__(self, state_dir: Path):
        self.dir = state_dir
        self.state = json.loads((state_dir / local_cluster.STATE_FILE).read_text())

    def ips(self) -> dict[str, str]:
        return {n["node_id"]: n["node_ip"] for n in local_cluster.ray_list(self.state, "nodes")}

    def placed(self, class_name: str) -> list[str]:
        """The node address of every live actor of `class_name`."""
        ips = self.ips()
        return sorted(ips[a["node_id"]] for a in local_cluster.ray_list(self.state, "actors", f"class_name={class_name}",
                                                                        "state=ALIVE"))

    def kill(self, ip: str) -> float:
        local_cluster.kill_node(self.dir, ip)
        return time.time()

    def replace(self) -> str:
        return local_cluster.add_node(self.dir)["nodes"][-1]["ip"]


def _ray_env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "token"}


def workflow_job(cluster: Cluster, manifest: str, label: str, work: Path, settings: list[str]) -> subprocess.Popen:
    prefix = f"s3://{BUCKET}/{label}"
    command = [str(BIN / "ray"), "job", "submit", f"--address={cluster.state['address']}", f"--working-dir={ROOT}", "--",
               "python", "pipelines/workflow.py", "--manifest", manifest, f"registry={prefix}/registry",
               f"artifacts={prefix}/artifacts", f"work_dir={work / label}", *settings]
    log = open(work / f"{label}.log", "w")
    return subprocess.Popen(command, env=_ray_env(), stdout=log, stderr=subprocess.STDOUT, text=True)


def wait_for_sgd_checkpoint(job: subprocess.Popen, label: str, timeout: float = 1800) -> int:
    """Until a checkpoint after the fit (step > 0) of the label's run is registered in its snapshot on S3."""
    s3, deadline = boto3.client("s3"), time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{label}/artifacts/runs/").get("Contents", [])
        for key in [o["Key"] for o in listed if o["Key"].endswith("checkpoint_manager_snapshot.json")]:
            steps = [int(s) for s in re.findall(r'"step": ?(\d+)', s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode())]
            if steps and max(steps) > 0:
                return max(steps)
        time.sleep(1)
    raise SystemExit(f"no checkpoint after the fit was registered (see the {label} job's log)")


def finish(job: subprocess.Popen, label: str, work: Path) -> dict:
    if job.wait() != 0:
        raise SystemExit(f"the {label} workflow failed; see {work / f'{label}.log'}")
    text = (work / f"{label}.log").read_text()
    return json.loads(text[text.rindex("\n{\n"):text.rindex("\n}") + 2])  # the workflow's summary, printed last


def serving_under_node_loss(cluster: Cluster, url: str, seconds_before: float, seconds_after: float) -> dict:
    """Clients (2 with the openai client's default retries, 2 with none) ask while a replica's node is killed."""
    outcomes: dict[bool, list] = {True: [], False: []}
    served_5xx: dict[bool, int] = {True: 0, False: 0}
    stop = threading.Event()

    def ask(retries: bool) -> None:
        def seen(response: httpx.Response) -> None:
            served_5xx[retries] += response.status_code >= 500

        http = httpx.Client(event_hooks={"response": [seen]}, timeout=120)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", http_client=http, max_retries=2 if retries else 0)
        while not stop.is_set():
            started = time.time()
            try:
                client.completions.create(model="meteora", prompt="Reverse the words: a b c", max_tokens=12, temperature=0)
                outcome = "ok"
            except openai.APIStatusError as err:
                outcome = err.status_code
            except openai.APIConnectionError as err:
                outcome = type(err).__name__
            outcomes[retries].append((started, time.time(), outcome))

    clients = [threading.Thread(target=ask, args=(retries,)) for retries in (True, True, False, False)]
    for client in clients:
        client.start()
    time.sleep(seconds_before)
    replicas = cluster.placed(REPLICA)
    victim = next(ip for ip in replicas if ip != local_cluster.HEAD_IP)
    killed_at = cluster.kill(victim)
    time.sleep(seconds_after)
    replacement = cluster.replace()
    restored_at = wait_for_replicas(cluster, 2)
    stop.set()
    for client in clients:
        client.join()
    result = {"replicas_before": replicas, "killed_node": victim, "replacement_node": replacement,
              "replicas_after": cluster.placed(REPLICA), "replica_count_restored_s": round(restored_at - killed_at, 1)}
    for retries, label in ((True, "default_retries"), (False, "no_retries")):
        during = [o for s, e, o in outcomes[retries] if e >= killed_at and s <= restored_at]
        result[label] = {"sent": len(outcomes[retries]), "answered": sum(o == "ok" for *_, o in outcomes[retries]),
                         "failed": dict(Counter(str(o) for *_, o in outcomes[retries] if o != "ok")),
                         "5xx_seen_by_the_client": served_5xx[retries],
                         "during_the_loss": {"sent": len(during), "answered": during.count("ok")},
                         "longest_request_s": round(max(e - s for s, e, _ in outcomes[retries]), 1)}
    return result


def wait_for_replicas(cluster: Cluster, count: int, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(cluster.placed(REPLICA)) == count:
            return time.time()
        time.sleep(0.5)
    raise SystemExit(f"{count} replicas did not run again within {timeout} s")


def compare_runs(disturbed: dict, calm: dict) -> dict:
    """Registry entries and checkpoints of the two runs: what must not differ."""
    registries = [Registry(f"s3://{BUCKET}/{label}/registry") for label in ("disturbed", "calm")]
    entries = [{n: {k: r.entry(n)[k] for k in ("sha256", "content_sha256")} for n in r.names} for r in registries]
    models = [MeteoraModel.from_pretrained(run["train"]["checkpoint"]) for run in (disturbed, calm)]
    gaps = [(a.meteora_gate - b.meteora_gate).abs().max().item()
            for a, b in zip(models[0].layers.values(), models[1].layers.values())]
    experts = [[(e.name, e.sha256) for e in m.experts] for m in models]
    return {"registry_entries_equal": entries[0] == entries[1], "experts_equal": experts[0] == experts[1],
            "gates_max_abs_difference": max(gaps), "gates_equal_within_1e-5": max(gaps) <= 1e-5,
            "checkpoints": [run["train"]["checkpoint"] for run in (disturbed, calm)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-demo", choices=sorted(SUITES))
    parser.add_argument("--steps", type=int, default=12, help="SGD steps after the fit (checkpoints every steps/3)")
    parser.add_argument("--work", default="/tmp/meteora-chaos")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cluster"))
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    suite = SUITES[args.model]
    built = Path(suite.build())  # in this process's cache; the nodes keep their own
    os.environ.pop("METEORA_CACHE", None)
    s3 = LocalS3(work / "s3").start()
    os.environ.update({**s3.env, **FAST_NODE_DEATH})
    began, result = time.time(), {"command": "python " + " ".join(sys.argv), "machine": machine(), "model": args.model}
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        manifest, _ = publish(built, f"s3://{BUCKET}/assets", suite.first)
        local_cluster.up(work / "cluster", num_cpus=2, nodes=3, head_cpus=1)
        cluster = Cluster(work / "cluster")
        port = local_cluster.free_ports(1)[0]
        every = max(1, args.steps // 3)
        # batch 4 (2 samples a worker): at 16 a worker holds about 6 GB, and the replacement group after the node
        # loss met the first one's memory on this one 24 GB machine (Ray's memory monitor killed it at 95%)
        settings = [*suite.settings, "train.method=fit+sgd", f"train.steps={args.steps}", f"train.checkpoint_every={every}",
                    "train.batch=4",
                    "train.placement=STRICT_SPREAD", "train.max_failures=3", "evaluate.enabled=false",
                    "deploy.host=127.0.0.2", f"deploy.http_port={port}",
                    "deploy.deployment={ray_actor_options: {num_cpus: 0.5}, max_replicas_per_node: 1, "
                    "autoscaling_config: {min_replicas: 2, initial_replicas: 2, max_replicas: 2}, "
                    "health_check_period_s: 2, health_check_timeout_s: 10, max_surge_percent: 100}"]
        job = workflow_job(cluster, manifest, "disturbed", work, settings)
        resumable = wait_for_sgd_checkpoint(job, "disturbed")
        workers = cluster.placed("RayTrainWorker")
        killed_at = cluster.kill(workers[0])
        time.sleep(5)
        replacement = cluster.replace()
        disturbed = finish(job, "disturbed", work)
        model = MeteoraModel.from_pretrained(disturbed["train"]["checkpoint"])
        summary = model.training_summary
        resumed = summary["attempts"][-1]
        result["collect_tasks_on"] = dict(Counter(cluster.ips().get(t["node_id"], t["node_id"])
                                                  for t in local_cluster.ray_list(cluster.state, "tasks", "name=_fetch")))
        result["training"] = {
            "workers_on": workers, "checkpoint_registered_at_step": resumable, "killed_node": workers[0],
            "replacement_node": replacement, "attempts": summary["attempts"],
            "resumed_after_step": resumed["started_after_step"],
            "recovered_s": round(resumed["started_at"] - killed_at, 1),
            "steps_recorded": [r["step"] for r in summary["history"]]}
        url = f"http://127.0.0.2:{port}"
        result["serving"] = serving_under_node_loss(cluster, url, seconds_before=10, seconds_after=15)
        calm = finish(workflow_job(cluster, manifest, "calm", work, [*settings, "deploy.enabled=false"]), "calm", work)
        result["undisturbed_comparison"] = compare_runs(disturbed, calm)
    finally:
        local_cluster.down(work / "cluster")
        s3.stop()
    result["seconds"] = round(time.time() - began)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stopped from outside: the cluster and S3 still go down
    torch.set_num_threads(2)
    main()
