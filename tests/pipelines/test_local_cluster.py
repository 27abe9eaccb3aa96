"""`make cluster-down` stops only what `make cluster-up` started: a state file left by a crash whose process group id
now belongs to other processes kills nothing. `pipelines/local_s3.py up` starts a real S3 server and `down`
stops it."""
import json
import subprocess
import sys
import time
from pathlib import Path

import boto3

from pipelines import local_cluster


def test_a_stale_state_file_kills_no_other_process_group(tmp_path):
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a group that is not a Ray cluster
    try:
        state = {"pgid": other.pid, "temp_dir": str(tmp_path / "meteora-ray-gone")}
        (tmp_path / local_cluster.STATE_FILE).write_text(json.dumps(state))
        assert local_cluster.down(tmp_path)
        time.sleep(0.5)
        assert other.poll() is None, "down() signalled a process group that was not its cluster's"
        assert not (tmp_path / local_cluster.STATE_FILE).exists()
    finally:
        other.kill()
        other.wait()


def test_the_s3_server_command_starts_one_and_stops_it(tmp_path):
    script = [sys.executable, str(Path(local_cluster.__file__).parent / "local_s3.py")]
    up = subprocess.run([*script, "up", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120, check=True)
    state = json.loads((tmp_path / "s3.json").read_text())
    try:
        env = dict(line.removeprefix("  export ").split("=", 1) for line in up.stdout.splitlines() if "export " in line)
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
        s3.create_bucket(Bucket="cli")
        s3.put_object(Bucket="cli", Key="a", Body=b"b")
        assert s3.get_object(Bucket="cli", Key="a")["Body"].read() == b"b"
    finally:
        subprocess.run([*script, "down", "--dir", str(tmp_path)], capture_output=True, timeout=60, check=True)
    assert not (tmp_path / "s3.json").exists()
    assert not local_cluster.group_alive(state["pgid"])
