"""`make cluster-down` stops only what `make cluster-up` started: a state file left by a crash whose process group id
now belongs to other processes kills nothing."""
import json
import subprocess
import time

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
