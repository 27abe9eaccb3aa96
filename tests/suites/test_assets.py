"""Suite builds run in a child process, so the memory a build takes is the machine's again when it ends (a
chattasks build left 6.7 GB in the demo's process, and the gate training after it was killed for memory), and
that child ends with its parent (a job driver stopped mid-build left one running, 1.3 GB, after its cluster)."""
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from suites.assets import cached_build


def build_into(local: Path, uri: str, fail: bool = False) -> None:
    if fail:
        raise ValueError("the recipe is wrong")
    local.mkdir(parents=True)
    (local / "pid").write_text(str(os.getpid()))
    (local / "manifest.yaml").write_text(f"built: {uri}\n")


def test_a_build_runs_in_a_child_process_and_is_found_again(tmp_path):
    manifest = cached_build(str(tmp_path), "suite", "k1", build_into)
    assert manifest == f"{tmp_path}/suite-k1/manifest.yaml"
    assert int((tmp_path / "suite-k1" / "pid").read_text()) != os.getpid()
    (tmp_path / "suite-k1" / "pid").unlink()
    assert cached_build(str(tmp_path), "suite", "k1", build_into) == manifest  # found: nothing built again
    assert not (tmp_path / "suite-k1" / "pid").exists()


def test_a_failed_build_raises_here_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="the recipe is wrong"):
        cached_build(str(tmp_path), "suite", "k1", functools.partial(build_into, fail=True))
    assert not list(tmp_path.iterdir())


def endless_build(local: Path, uri: str) -> None:
    (Path(uri).parent / "started").write_text(str(os.getpid()))  # uri: <out>/<name>-<key>
    time.sleep(600)


def test_a_driver_killed_mid_build_leaves_no_child_running(tmp_path):
    here, root = Path(__file__).parent, Path(__file__).parents[2]
    driver = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path[:0] = {[str(root), str(here)]}; "
                               "import test_assets; from suites.assets import cached_build; "
                               f"cached_build({str(tmp_path)!r}, 'suite', 'k', test_assets.endless_build)"])
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("**/started")) and time.monotonic() < deadline:
        time.sleep(0.2)
    builder = psutil.Process(int(next(tmp_path.glob("**/started")).read_text()))
    driver.kill()  # SIGKILL: the driver runs no cleanup
    driver.wait()
    gone, alive = psutil.wait_procs([builder], timeout=15)
    assert not alive, "the build's child process outlived its parent"
