"""The evaluation of a checkpoint that fuses a single adapter (a registry's first, say): top-1 only, routed by the
checkpoint's own gates."""
import copy

import pytest

from meteora_moe import MeteoraModel
from meteora_moe.evaluation import CompositeSettings, evaluate, load_benchmark
from meteora_moe.registry import Registry, load_manifest
from pipelines.collect_adapters import collect
from tiny import write_world

pytestmark = pytest.mark.usefixtures("local_ray")


def registry_of(tmp_path, tasks: dict[str, int]) -> Registry:
    """A tiny world's adapters, collected into a registry."""
    assert collect(load_manifest(write_world(tmp_path / "world", tasks)), str(tmp_path / "registry")).committed
    return Registry(tmp_path / "registry")


def test_a_checkpoint_of_one_expert_is_evaluated_at_top_1(tmp_path):
    bench = load_benchmark(registry_of(tmp_path, {"reverse": 4}), samples=3)
    MeteoraModel.from_adapters(copy.deepcopy(bench.base), bench.adapters, top_k=1).save_pretrained(tmp_path / "ckpt")
    results = evaluate(bench, tmp_path / "ckpt", CompositeSettings(sizes=(2,), count=1))
    assert "meteora top-1" in results["per_task"] and "meteora top-2" not in results["per_task"]
    assert results["routing_accuracy"] == 1.0


def test_a_checkpoint_without_a_task_s_expert_is_refused_before_any_scoring(tmp_path):
    bench = load_benchmark(registry_of(tmp_path, {"reverse": 4, "upper": 4}), samples=3)
    fused = MeteoraModel.from_adapters(copy.deepcopy(bench.base), {"reverse": bench.adapters["reverse"]}, top_k=1)
    fused.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"no experts for the tasks \['upper'\] \(it has \['reverse'\]\)"):
        evaluate(bench, tmp_path / "ckpt", CompositeSettings(sizes=(2,), count=1), tmp_path / "out")
    assert not (tmp_path / "out").exists()
