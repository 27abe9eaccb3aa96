"""A local Ray cluster for `ray job submit` (`make cluster-up` / `make cluster-down`), stopping only its own processes.

    python pipelines/local_cluster.py up [--dir .ray-cluster] [--nodes N] [--num-cpus C]
    python pipelines/local_cluster.py kill-node 127.0.0.3 [--dir .ray-cluster]   # lose a node's machine: SIGKILL
    python pipelines/local_cluster.py add-node [--dir .ray-cluster]              # a replacement worker node
    python pipelines/local_cluster.py down [--dir .ray-cluster]

`up` starts `ray start --head --block` on 127.0.0.2 and N-1 worker nodes on 127.0.0.3, .4, ... (loopback only;
Ray rewrites 127.0.0.1 to the machine's outward address), each `ray start --block` in its own process group from
this virtualenv (so jobs run its python), each a separate raylet with its own object store and C CPUs, and each
worker node with its own HOME and METEORA_CACHE under --dir, so no node reads another's local files: what nodes
share goes through the object store. Every port is
picked free in 20000-32000 (workers keep Ray's 10002-19999), token auth is on (a token is made in
~/.ray/auth_token on a machine that has none; worker nodes read that file), each node has its own temp dir, and
`up` waits until the job API answers and every node has joined; `--dir` keeps the state (addresses, process
groups, logs). `kill-node` SIGKILLs one worker node's process group, as losing its machine would (a SIGTERM
would drain it politely first). `down` ends those process groups and nothing else: never `ray stop`, which
kills every Ray process on the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

NODE_PORTS = ["node-manager-port", "object-manager-port", "dashboard-agent-grpc-port", "dashboard-agent-listen-port",
              "metrics-export-port", "runtime-env-agent-port"]
PORTS = ["port", "dashboard-port", "ray-client-server-port", *NODE_PORTS]
STATE_FILE = "cluster.json"
HEAD_IP = "127.0.0.2"  # Ray rewrites 127.0.0.1 to the machine's outward address: every node names its own loopback one
START_TIMEOUT_S = 90


def free_ports(count: int, high: int = 32000) -> list[int]:
    """`count` distinct free loopback ports in 20000-`high`."""
    ports = []
    for port in random.sample(range(20000, high), 2000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"not enough free ports in 20000-{high}")


def up(state_dir: Path, num_cpus: int, nodes: int = 1, head_cpus: int | None = None) -> dict:
    """Start the head (head_cpus CPUs, default num_cpus) and nodes-1 worker nodes of num_cpus each; returns the state."""
    if (state_dir / STATE_FILE).exists():
        raise SystemExit(f"a cluster from {state_dir} is already up ({state_dir / STATE_FILE}); run `make cluster-down` first")
    state_dir.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(PORTS, free_ports(len(PORTS))))
    temp_dir = Path(f"/tmp/meteora-ray-{ports['port']}")  # short: Ray's socket paths must stay under 108 bytes
    head_cpus = num_cpus if head_cpus is None else head_cpus
    command = [_ray(), "start", "--head", "--block", f"--num-cpus={head_cpus}", "--dashboard-host=127.0.0.1",
               f"--node-ip-address={HEAD_IP}", f"--temp-dir={temp_dir}", *(f"--{name}={port}" for name, port in ports.items())]
    # `ray start` reads the token and never makes one (ray.init does): make ~/.ray/auth_token on a machine that has
    # none, keep it otherwise. The command prints the token: it is captured, not shown.
    subprocess.run([_ray(), "get-auth-token", "--generate"], env=_env(), check=True, capture_output=True)
    process = _start(command, _env(), state_dir / "ray.log")
    state = {"pgid": process.pid, "address": f"http://127.0.0.1:{ports['dashboard-port']}",
             "gcs_address": f"{HEAD_IP}:{ports['port']}", "temp_dir": str(temp_dir), "log": str(state_dir / "ray.log"),
             "num_cpus": num_cpus, "nodes": [],  # num_cpus: each worker node's
             "token_path": str(Path.home() / ".ray" / "auth_token")}  # worker nodes read it, whoever adds them
    _save(state_dir, state)
    if not _wait_until_up(state["address"], process):
        down(state_dir)
        raise SystemExit(f"the Ray head did not come up in {START_TIMEOUT_S} s; see {state_dir / 'ray.log'}")
    try:
        for _ in range(nodes - 1):
            state = add_node(state_dir)
    except BaseException:  # a node that did not join: nothing of this cluster is left running
        down(state_dir)
        raise
    return state


def add_node(state_dir: Path) -> dict:
    """Start one more worker node on the next unused loopback address (127.0.0.3, .4, ...) and wait until it joins."""
    state = _load(state_dir)
    used = {HEAD_IP, *(node["ip"] for node in state["nodes"] + state.get("killed", []))}  # a new machine, a new address
    ip = next(f"127.0.0.{i}" for i in range(3, 255) if f"127.0.0.{i}" not in used)
    home = state_dir / f"node-{ip}"
    (home / "cache").mkdir(parents=True, exist_ok=True)
    ports = dict(zip(NODE_PORTS, free_ports(len(NODE_PORTS))))
    # its own temp dir: on one machine a worker node would use the head's, and its runtime-env agent would delete
    # the job's working_dir there (the driver's cwd) when its own tasks no longer need it
    temp_dir = f"{state['temp_dir']}-{ip.rsplit('.', 1)[1]}"
    command = [_ray(), "start", "--block", f"--address={state['gcs_address']}", f"--node-ip-address={ip}",
               f"--num-cpus={state['num_cpus']}", f"--temp-dir={temp_dir}",
               *(f"--{name}={port}" for name, port in ports.items())]
    env = _env(HOME=str(home), METEORA_CACHE=str(home / "cache"), RAY_AUTH_TOKEN_PATH=state["token_path"])
    process = _start(command, env, home / "ray.log")
    state["nodes"].append({"ip": ip, "pgid": process.pid, "log": str(home / "ray.log"), "temp_dir": temp_dir})
    _save(state_dir, state)
    if not _wait_for_node(state, ip, process):
        raise SystemExit(f"worker node {ip} did not join in {START_TIMEOUT_S} s; see {home / 'ray.log'}")
    return state


def kill_node(state_dir: Path, ip: str) -> None:
    """SIGKILL worker node `ip`'s whole process group (raylet, object store, workers): the node's machine is gone."""
    state = _load(state_dir)
    node = next((n for n in state["nodes"] if n["ip"] == ip), None)
    if node is None:
        raise SystemExit(f"no worker node {ip} in {state_dir} (nodes: {[n['ip'] for n in state['nodes']]}); "
                         "the head cannot be killed this way")
    signal_group(node["pgid"], signal.SIGKILL, 10)
    state["nodes"].remove(node)
    _save(state_dir, {**state, "killed": [*state.get("killed", []), node]})


def _ray() -> str:
    return str(Path(sys.executable).parent / "ray")


def _env(**extra: str) -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token", **extra}


def _start(command: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _load(state_dir: Path) -> dict:
    if not (state_dir / STATE_FILE).exists():
        raise SystemExit(f"no cluster from {state_dir} is up: run `make cluster-up` first")
    return json.loads((state_dir / STATE_FILE).read_text())


def _save(state_dir: Path, state: dict) -> None:
    (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))


def ray_list(state: dict, kind: str, *filters: str) -> list[dict]:
    """Ray's state API (`ray list KIND --filter ...`) asked of the cluster's GCS with its token; raises
    CalledProcessError when the GCS does not answer."""
    command = [_ray(), "list", kind, f"--address={state['gcs_address']}", "--format=json", "--limit=10000"]
    for condition in filters:
        command += ["--filter", condition]
    listed = subprocess.run(command, env=_env(RAY_AUTH_TOKEN_PATH=state["token_path"]), capture_output=True, text=True,
                            check=True)
    return json.loads(listed.stdout) if listed.stdout.startswith("[") else []  # none: "No resource in the cluster"


def _wait_for_node(state: dict, ip: str, process: subprocess.Popen) -> bool:
    """Whether a live node with address `ip` is in the cluster before the deadline (asked of the GCS by `ray list`)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(subprocess.CalledProcessError):  # the GCS not answering yet
            if ray_list(state, "nodes", "state=ALIVE", f"node_ip={ip}"):
                return True
        time.sleep(1)
    return False


def _wait_until_up(address: str, process: subprocess.Popen) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return True
        except urllib.error.HTTPError:  # answering (auth says no): the job API is up
            return True
        except OSError:
            time.sleep(1)
    return False


def down(state_dir: Path) -> bool:
    """Stop the cluster started from `state_dir` (its worker nodes, then its head); False when none was up.
    Each process group is SIGKILLed: the cluster keeps no state beyond its temp dirs (no GCS persistence), so a
    SIGTERM, which drains a worker node for 30 s and the head for 10-20, would save nothing."""
    state_file = state_dir / STATE_FILE
    if not state_file.exists():
        return False
    state = json.loads(state_file.read_text())
    for pgid in [node["pgid"] for node in state.get("nodes", [])] + [state["pgid"]]:
        if _runs_the_cluster(pgid, state):  # after a crash the group id may belong to others now
            signal_group(pgid, signal.SIGKILL, 10)
    for node in state.get("nodes", []) + state.get("killed", []):
        shutil.rmtree(node["temp_dir"], ignore_errors=True)
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    state_file.unlink()
    return True


def _runs_the_cluster(pgid: int, state: dict) -> bool:
    """Whether a process of the group `pgid` is one of the cluster's: its command line names the head's temp dir
    (the head) or its GCS address (a worker node)."""
    marks = (state["temp_dir"], state.get("gcs_address", state["temp_dir"]))
    for process in psutil.process_iter(["cmdline"]):
        try:
            line = " ".join(process.info["cmdline"] or ())
            if os.getpgid(process.pid) == pgid and any(mark in line for mark in marks):
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def signal_group(pgid: int, sig: int, wait_s: float) -> bool:
    """Send `sig` to the process group; True if some of it is still alive after `wait_s`."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # the group's leader, when this process started it: reap it
            os.waitpid(pgid, os.WNOHANG)
        if not group_alive(pgid):
            return False
        time.sleep(0.2)
    return True


def group_alive(pgid: int) -> bool:
    """Whether a process of the group runs: a zombie (dead, not yet reaped by whoever adopted it) does not."""
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "add-node", "kill-node"])
    parser.add_argument("node_ip", nargs="?", help="kill-node: the worker node's address (127.0.0.3, ...)")
    parser.add_argument("--dir", default=".ray-cluster", help="where the cluster's state and logs are kept")
    parser.add_argument("--nodes", type=int, default=1, help="up: the head and nodes-1 worker nodes")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs each node offers Ray")
    parser.add_argument("--head-cpus", type=int, default=None, help="CPUs the head offers (default --num-cpus; 0: "
                        "only drivers, Serve's controller and proxy run there)")
    args = parser.parse_args(argv)
    state_dir = Path(args.dir).resolve()
    if args.action == "down":
        print("cluster stopped" if down(state_dir) else f"no cluster from {state_dir} is up")
    elif args.action == "kill-node":
        if not args.node_ip or not args.node_ip.startswith("127."):
            parser.error("kill-node needs a worker node's loopback address, e.g. 127.0.0.3")
        kill_node(state_dir, args.node_ip)
        print(f"node {args.node_ip} killed (SIGKILL of its process group)")
    elif args.action == "add-node":
        print(f"node {add_node(state_dir)['nodes'][-1]['ip']} joined")
    else:
        state = up(state_dir, args.num_cpus, args.nodes, args.head_cpus)
        workers = ", ".join(n["ip"] for n in state["nodes"])
        print(f"Ray head up at {state['address']} (GCS {state['gcs_address']}){f'; worker nodes {workers}' if workers else ''}; "
              f"log {state['log']}\nsubmit jobs with:\n  RAY_AUTH_MODE=token ray job submit --address {state['address']} "
              f"--working-dir . -- python pipelines/train_gates.py\nstop it with: make cluster-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
