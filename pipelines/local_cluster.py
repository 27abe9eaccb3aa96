"""A local Ray head for `ray job submit` (`make cluster-up` / `make cluster-down`), stopping only its own processes.

    python pipelines/local_cluster.py up [--dir .ray-cluster] [--num-cpus N]
    python pipelines/local_cluster.py down [--dir .ray-cluster]

`up` starts `ray start --head --block` in a new process group from this virtualenv (so jobs run its python),
with every port picked free in 20000-32000 (workers keep Ray's 10002-19999), token auth on (a token is made in
~/.ray/auth_token on a machine that has none), its own temp dir, and waits until the job API answers; `--dir`
keeps the state (address, process group, log). `down` ends that process group and nothing else: never
`ray stop`, which kills every Ray process on the machine.
"""
from __future__ import annotations

import argparse
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

PORTS = ["port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
         "dashboard-agent-grpc-port", "dashboard-agent-listen-port", "metrics-export-port", "runtime-env-agent-port"]
STATE_FILE = "cluster.json"
START_TIMEOUT_S = 90


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports in 20000-32000."""
    ports = []
    for port in random.sample(range(20000, 32000), 2000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("not enough free ports in 20000-32000")


def up(state_dir: Path, num_cpus: int) -> dict:
    if (state_dir / STATE_FILE).exists():
        raise SystemExit(f"a cluster from {state_dir} is already up ({state_dir / STATE_FILE}); run `make cluster-down` first")
    state_dir.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(PORTS, free_ports(len(PORTS))))
    temp_dir = Path(f"/tmp/meteora-ray-{ports['port']}")  # short: Ray's socket paths must stay under 108 bytes
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}", "--dashboard-host=127.0.0.1",
               "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", *(f"--{name}={port}" for name, port in ports.items())]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token"}
    # `ray start` reads the token and never makes one (ray.init does): make ~/.ray/auth_token on a machine that has
    # none, keep it otherwise. The command prints the token: it is captured, not shown.
    subprocess.run([str(bin_dir / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    log = open(state_dir / "ray.log", "wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    state = {"pgid": process.pid, "address": f"http://127.0.0.1:{ports['dashboard-port']}",
             "gcs_address": f"127.0.0.1:{ports['port']}", "temp_dir": str(temp_dir), "log": str(state_dir / "ray.log")}
    (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    if not _wait_until_up(state["address"], process):
        down(state_dir)
        raise SystemExit(f"the Ray head did not come up in {START_TIMEOUT_S} s; see {state_dir / 'ray.log'}")
    return state


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
    """Stop the cluster started from `state_dir`; False when none was up."""
    state_file = state_dir / STATE_FILE
    if not state_file.exists():
        return False
    state = json.loads(state_file.read_text())
    if _runs_the_cluster(state["pgid"], state["temp_dir"]):  # after a crash the group id may belong to others now
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if not _signal_group(state["pgid"], sig, wait_s):  # after SIGKILL, unreaped zombies may still answer
                break
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    state_file.unlink()
    return True


def _runs_the_cluster(pgid: int, temp_dir: str) -> bool:
    """Whether a process of the group `pgid` runs with the cluster's temp dir on its command line."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            if os.getpgid(process.pid) == pgid and temp_dir in " ".join(process.info["cmdline"] or ()):
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _signal_group(pgid: int, sig: int, wait_s: float) -> bool:
    """Send `sig` to the process group; True if some of it is still alive after `wait_s`."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.5)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", default=".ray-cluster", help="where the cluster's state and log are kept")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    state_dir = Path(args.dir).resolve()
    if args.action == "down":
        print("cluster stopped" if down(state_dir) else f"no cluster from {state_dir} is up")
        return 0
    state = up(state_dir, args.num_cpus)
    print(f"Ray head up at {state['address']} (GCS {state['gcs_address']}); log {state['log']}\n"
          f"submit jobs with:\n  RAY_AUTH_MODE=token ray job submit --address {state['address']} --working-dir . "
          f"-- python pipelines/train_gates.py\nstop it with: make cluster-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
