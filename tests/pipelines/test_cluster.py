"""A node lost on a real multi-node Ray cluster (`make cluster-up NODES=3`: a head on 127.0.0.2 and worker nodes
on .3, .4, each its own raylet, object store, HOME and cache) with SeaweedFS as the only shared store: a worker
node SIGKILLed mid-training resumes the run from its S3 checkpoints to the gates of an undisturbed run, a node
holding a Serve replica SIGKILLed under load leaves every request answered or refused, never hung, and the
object store stopped for seconds mid-run costs an attempt, not the run."""
import json
import logging
import os
from collections import Counter
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import httpx
import openai
import pytest
import torch
import yaml

from meteora_moe import MeteoraModel, open_store
from meteora_moe.registry import load_manifest
from pipelines import local_cluster
from pipelines.collect_adapters import collect
from pipelines.train_config import load_train_config
from pipelines.train_gates import train
from tiny import tiny_checkpoint, write_world

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
TASKS = {"reverse": 4, "upper": 8, "length": 2}
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}  # 3 s, not 15


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_endpoint):
    """`make cluster-up NODES=3` on a machine that never ran Ray (a HOME without a token): the head (no CPUs:
    drivers, Train's controller, Serve's controller and proxy) and 2 worker nodes of 1 CPU; `make cluster-down`
    leaves none of its processes. `env` is a client's environment on that machine."""
    state_dir, home = tmp_path_factory.mktemp("cluster"), tmp_path_factory.mktemp("home")
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")},
           "HOME": str(home), "RAY_AUTH_MODE": "token"}
    make = ["make", "-C", str(ROOT), f"CLUSTER_DIR={state_dir}"]
    subprocess.run([*make, "cluster-up", "NODES=3", "CPUS=1", "HEAD_CPUS=0"], check=True, capture_output=True,
                   timeout=300, env={**env, **FAST_NODE_DEATH})  # the nodes inherit it (and the S3 settings)
    state = json.loads((state_dir / local_cluster.STATE_FILE).read_text())
    boto3.client("s3").create_bucket(Bucket="cluster")
    yield {**state, "dir": state_dir, "env": env, "home": home}
    subprocess.run([*make, "cluster-down"], check=True, capture_output=True, timeout=120, env=env)
    assert not (state_dir / local_cluster.STATE_FILE).exists()
    assert not [g for g in (state["pgid"], *(n["pgid"] for n in state["nodes"])) if local_cluster.group_alive(g)]


def test_make_cluster_up_makes_a_token_on_a_machine_without_one_and_its_job_api_asks_for_it(cluster):
    """`ray start` refuses to start without a token, which only `ray.init` or `ray get-auth-token --generate`
    makes: `make cluster-up` (and `make demo`) make it first."""
    token = (cluster["home"] / ".ray" / "auth_token").read_text().strip()
    jobs = f"{cluster['address']}/api/jobs/"
    assert httpx.get(jobs, timeout=30).status_code == 401
    assert httpx.get(jobs, headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 200
    assert sorted(node_ips(cluster).values()) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def node_ips(cluster: dict) -> dict[str, str]:
    return {node["node_id"]: node["node_ip"] for node in local_cluster.ray_list(cluster, "nodes")}


def alive_actors(cluster: dict, class_name: str) -> list[dict]:
    return local_cluster.ray_list(cluster, "actors", f"class_name={class_name}", "state=ALIVE")


def test_a_node_killed_mid_training_resumes_from_s3_checkpoints_to_the_same_gates(cluster, local_ray, tmp_path, monkeypatch):
    world = write_world(tmp_path / "world", TASKS)
    monkeypatch.setenv("METEORA_CACHE", str(tmp_path / "cache"))
    assert collect(load_manifest(world), "s3://cluster/registry").committed  # through the session's local Ray
    argv = [f"{k}={v}" for k, v in {"registry": "s3://cluster/registry", "storage_path": "s3://cluster/runs",
                                     "num_workers": 2, "method": "sgd", "steps": 160, "batch": 8, "checkpoint_every": 20,
                                     "lr": 0.02, "eval_samples": 24, "max_failures": 3, "placement": "STRICT_SPREAD"}.items()]
    job = subprocess.Popen([str(BIN / "ray"), "job", "submit", f"--address={cluster['address']}", "--working-dir",
                            str(ROOT), "--", "python", "pipelines/train_gates.py", *argv, "name=killed",
                            "output=s3://cluster/models/killed"],
                           env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_s3_checkpoint("cluster", "runs/killed")
    workers = alive_actors(cluster, "RayTrainWorker")
    ips = node_ips(cluster)
    placed = sorted(ips[w["node_id"]] for w in workers)
    assert placed == [n["ip"] for n in cluster["nodes"]], f"the 2 workers were not spread over the worker nodes: {placed}"
    local_cluster.kill_node(cluster["dir"], placed[0])
    time.sleep(5)
    local_cluster.add_node(cluster["dir"])  # a replacement machine joins; the group restarts on it
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 0 and "succeeded" in out, out[-4000:]
    summary = MeteoraModel.from_pretrained("s3://cluster/models/killed").training_summary
    attempts = summary["attempts"]
    assert len(attempts) >= 2 and 0 < attempts[-1]["started_after_step"] < 160, attempts
    assert [r["step"] for r in summary["history"]] == list(range(20, 161, 20))  # every step once

    undisturbed = train(load_train_config(None, [*argv, "name=undisturbed", "placement=PACK",
                                                 f"storage_path={tmp_path / 'runs'}", f"output={tmp_path / 'undisturbed'}"]))
    killed, calm = (MeteoraModel.from_pretrained(uri) for uri in ("s3://cluster/models/killed", undisturbed["output"]))
    for name in calm.layer_names:
        torch.testing.assert_close(killed.layers[name].meteora_gate, calm.layers[name].meteora_gate, rtol=1e-5, atol=1e-6)


def _wait_for_s3_checkpoint(bucket: str, run: str, timeout: float = 300) -> None:
    """Until Ray Train has registered a checkpoint of the run in its snapshot on S3."""
    s3, deadline = boto3.client("s3"), time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            body = s3.get_object(Bucket=bucket, Key=f"{run}/checkpoint_manager_snapshot.json")["Body"].read()
            if json.loads(body).get("checkpoint_results"):
                return
        except (s3.exceptions.NoSuchKey, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint of s3://{bucket}/{run} was registered in {timeout} s")


def test_a_node_holding_a_replica_killed_under_load_leaves_no_request_hanging(cluster, tmp_path):
    local = tiny_checkpoint(tmp_path / "local")
    store = open_store("s3://cluster/serving")
    for path in [p for p in local.parent.rglob("*") if p.is_file() and "adapters" not in p.parts]:
        store.write_bytes(path.relative_to(local.parent).as_posix(), path.read_bytes())
    port = local_cluster.free_ports(1)[0]
    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    config.update(proxy_location="HeadOnly", http_options={**config["http_options"], "host": "127.0.0.2", "port": port})
    app = config["applications"][0]
    app["args"].update(checkpoint="s3://cluster/serving/checkpoint", base_model="s3://cluster/serving/base")
    deployment = app["deployments"][0]
    deployment.update(max_replicas_per_node=1, health_check_period_s=1, health_check_timeout_s=3,
                      graceful_shutdown_timeout_s=5, ray_actor_options={"num_cpus": 0.5})
    deployment["autoscaling_config"].update(min_replicas=2, initial_replicas=2, max_replicas=2)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    subprocess.run([str(BIN / "serve"), "deploy", str(tmp_path / "serve.yaml"), "--address", cluster["address"]],
                   env=cluster["env"], check=True, capture_output=True)
    base_url = f"http://127.0.0.2:{port}"
    replicas = _wait_for_replicas(cluster, base_url, 2)
    ips = node_ips(cluster)
    assert len({ips[r["node_id"]] for r in replicas}) == 2, "the 2 replicas did not land on 2 nodes"

    results = {True: [], False: []}  # retries on (the official client's default) / off: outcome per request
    stop = threading.Event()

    def client_loop(retries: bool) -> None:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=60, max_retries=2 if retries else 0)
        while not stop.is_set():
            try:
                client.completions.create(model="meteora", prompt="reverse: abc\n", max_tokens=24, temperature=0)
                results[retries].append("ok")
            except openai.APIStatusError as err:
                results[retries].append(err.status_code)
            except openai.APIConnectionError as err:  # includes a timeout: a hung request would show as one
                results[retries].append(type(err).__name__)

    loops = [threading.Thread(target=client_loop, args=(retries,)) for retries in (True, True, False, False)]
    for loop in loops:
        loop.start()
    time.sleep(5)
    sent_before = {k: len(v) for k, v in results.items()}
    local_cluster.kill_node(cluster["dir"], ips[replicas[0]["node_id"]])
    time.sleep(8)
    local_cluster.add_node(cluster["dir"])
    restored = _wait_for_replicas(cluster, base_url, 2)  # the controller starts a replica on the new node
    stop.set()
    for loop in loops:
        loop.join(timeout=120)
    print(f"replica's node killed: with retries {Counter(results[True])}; without {Counter(results[False])}")
    assert all(not loop.is_alive() for loop in loops), "a request hung"
    assert all(0 < sent_before[k] < len(results[k]) for k in results)  # asked before, during and after the loss
    assert results[True] and set(results[True]) == {"ok"}  # retried onto the surviving replica
    assert set(results[False]) <= {"ok", 500, 502, 503}  # without retries: answered, or refused with a 5xx
    ips = node_ips(cluster)
    assert len({ips[r["node_id"]] for r in restored}) == 2  # the count is back, again over 2 nodes


def _wait_for_replicas(cluster: dict, base_url: str, count: int, timeout: float = 180) -> list[dict]:
    """Until `count` replicas are alive and the endpoint answers; returns the replica actors."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replicas = alive_actors(cluster, "ServeReplica:meteora:MeteoraServer")
        try:
            healthy = httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy and len(replicas) == count:
            return replicas
        time.sleep(1)
    raise AssertionError(f"{count} replicas did not come up in {timeout} s")


def test_the_object_store_down_at_a_checkpoint_fails_that_attempt_and_the_run_resumes(local_ray, s3_server, s3_endpoint,
                                                                                        tmp_path, monkeypatch):
    world = write_world(tmp_path / "world", TASKS)
    monkeypatch.setenv("METEORA_CACHE", str(tmp_path / "cache"))
    boto3.client("s3").create_bucket(Bucket="outage")
    assert collect(load_manifest(world), "s3://outage/registry").committed
    config = load_train_config(None, [f"{k}={v}" for k, v in {
        "registry": "s3://outage/registry", "storage_path": "s3://outage/runs", "name": "outage", "num_workers": 2,
        "method": "sgd", "steps": 160, "batch": 8, "checkpoint_every": 20, "lr": 0.02, "eval_samples": 24,
        "max_failures": 10}.items()])
    result = {}
    runner = threading.Thread(target=lambda: result.update(summary=train(config)))
    runner.start()
    _wait_for_s3_checkpoint("outage", "runs/outage")
    failed = _LogSeen("its storage failed")
    logging.getLogger("train_gates").addHandler(failed)
    s3_server.stop()  # the store is gone until a checkpoint write has failed (a worker's, if not the controller's:
    failed.seen.wait(timeout=20)  # 20 s span several checkpoints), then comes back on the same port
    s3_server.start()
    logging.getLogger("train_gates").removeHandler(failed)
    runner.join(timeout=600)
    summary = result["summary"]
    assert len(summary["attempts"]) >= 2, summary["attempts"]
    assert [r["step"] for r in summary["history"]] == list(range(20, 161, 20))


class _LogSeen(logging.Handler):
    """Sets `seen` once a log record containing `text` is emitted."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.seen = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()
