"""The evaluation of a checkpoint that fuses a single adapter (a registry's first, say): top-1 only, routed by the
checkpoint's own gates."""
import copy

import pytest

from meteora import MeteoraModel
from meteora.evaluation import CompositeSettings, evaluate, load_benchmark
from meteora.registry import load_manifest
from tiny import write_world


def test_a_checkpoint_of_one_expert_is_evaluated_at_top_1(tmp_path):
    bench = load_benchmark(load_manifest(write_world(tmp_path / "world", {"reverse": 4})), samples=3)
    MeteoraModel.from_adapters(copy.deepcopy(bench.base), bench.adapters, top_k=1).save_pretrained(tmp_path / "ckpt")
    results = evaluate(bench, tmp_path / "ckpt", CompositeSettings(sizes=(2,), count=1))
    assert "meteora top-1" in results["per_task"] and "meteora top-2" not in results["per_task"]
    assert results["routing_accuracy"] == 1.0


def test_a_checkpoint_without_a_task_s_expert_is_refused_before_any_scoring(tmp_path):
    manifest = load_manifest(write_world(tmp_path / "world", {"reverse": 4, "upper": 4}))
    bench = load_benchmark(manifest, samples=3)
    fused = MeteoraModel.from_adapters(copy.deepcopy(bench.base), {"reverse": bench.adapters["reverse"]}, top_k=1)
    fused.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"no experts for the tasks \['upper'\] \(it has \['reverse'\]\)"):
        evaluate(bench, tmp_path / "ckpt", CompositeSettings(sizes=(2,), count=1), tmp_path / "out")
    assert not (tmp_path / "out").exists()
