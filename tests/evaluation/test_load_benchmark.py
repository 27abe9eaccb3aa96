"""load_benchmark reads what the registry collected (adapters, eval data, baselines), not what the manifest's sources
hold now, and names unknown tasks and baselines before anything is evaluated."""
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from meteora_moe import RegistryError
from meteora_moe.evaluation import load_benchmark
from meteora_moe.registry import Registry, load_manifest
from pipelines.collect_adapters import collect
from tiny import write_world


@pytest.fixture
def collected(tmp_path, local_ray):
    """A world whose manifest also names a baseline, collected into a registry; (manifest path, registry, world)."""
    manifest = write_world(tmp_path / "world", {"reverse": 4, "upper": 4})
    document = yaml.safe_load(manifest.read_text())
    shutil.copytree(tmp_path / "world" / "adapters" / "upper", tmp_path / "world" / "baselines" / "lora-b")
    document["baselines"] = [{"name": "lora-b", "uri": str(tmp_path / "world" / "baselines" / "lora-b")}]
    manifest.write_text(yaml.safe_dump(document, sort_keys=False))
    assert collect(load_manifest(manifest), str(tmp_path / "registry")).committed
    return manifest, Registry(tmp_path / "registry"), tmp_path / "world"


def test_evaluation_reads_the_registry_after_the_sources_changed(collected):
    _, registry, world = collected
    eval_file = world / "data" / "upper" / "eval.jsonl"
    collected_eval = [json.loads(line) for line in eval_file.read_text().splitlines()]
    weights = world / "adapters" / "upper" / "adapter_model.safetensors"
    collected_weights = load_file(weights)
    # every source changes after collection: other eval samples (one line broken), other adapter and baseline weights
    eval_file.write_text(json.dumps({"prompt": "changed", "response": "x"}) + "\n{broken\n")
    for path in (weights, world / "baselines" / "lora-b" / "adapter_model.safetensors"):
        save_file({k: torch.zeros_like(v) for k, v in load_file(path).items()}, path)
    bench = load_benchmark(registry, ["upper"], ["lora-b"], samples=5)
    assert bench.eval_sets["upper"] == collected_eval[:5]
    for directory in (bench.adapters["upper"], bench.baselines["lora-b"]):
        held = load_file(directory / "adapter_model.safetensors")
        assert all(torch.equal(held[k], collected_weights[k]) for k in collected_weights)  # lora-b is upper's copy
    assert not directory.is_relative_to(world)
    assert bench.metrics == {"upper": "exact_match"} and bench.fmt.name == "plain"


def test_unknown_tasks_and_baselines_are_named(collected):
    _, registry, _ = collected
    with pytest.raises(ValueError, match=r"unknown tasks \['nope'\]; it holds \['reverse', 'upper'\]"):
        load_benchmark(registry, ["reverse", "nope"])
    with pytest.raises(RegistryError, match=r"has no baselines \['merged'\]; it holds \['lora-b'\]"):
        load_benchmark(registry, ["reverse"], ["merged"])
    assert list(load_benchmark(registry).eval_sets) == ["reverse", "upper"] and not load_benchmark(registry).baselines
