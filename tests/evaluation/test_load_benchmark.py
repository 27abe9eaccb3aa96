"""load_benchmark names what is wrong in a manifest's tasks or eval data before anything is evaluated."""
import pytest

from meteora.evaluation import load_benchmark
from meteora.registry import load_manifest
from tiny import write_world


def test_unknown_tasks_and_broken_eval_lines_are_named(tmp_path):
    manifest = load_manifest(write_world(tmp_path, {"reverse": 4, "upper": 4}))
    with pytest.raises(ValueError, match=r"unknown tasks \['nope'\]; the manifest has \['reverse', 'upper'\]"):
        load_benchmark(manifest, ["reverse", "nope"])
    eval_file = tmp_path / "data" / "upper" / "eval.jsonl"
    eval_file.write_text(eval_file.read_text() + "{broken\n")  # after its 16 samples
    with pytest.raises(ValueError, match=r"eval data .*upper/eval\.jsonl: line 17 is not valid JSON"):
        load_benchmark(manifest)
    assert len(load_benchmark(manifest, ["reverse"], samples=3).eval_sets["reverse"]) == 3
