"""Suite builds run in a child process, so the memory a build takes is the machine's again when it ends (a
chattasks build left 6.7 GB in the demo's process, and the gate training after it was killed for memory)."""
import functools
import os
from pathlib import Path

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
