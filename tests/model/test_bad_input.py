"""Every bad input raises a clear error naming what is wrong, and leaves the base model as it was."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from meteora_moe import AdapterError, MeteoraLinear, MeteoraModel, load_adapter
from meteora_moe.errors import InvalidRequest, UnknownExpert
from tiny import make_adapter, tiny_base

WEIGHTS = "adapter_model.safetensors"


def _first_key(path, factor="A"):
    return next(k for k in load_file(path / WEIGHTS) if f"lora_{factor}" in k)


def _break(kind, base, root):
    """Make a broken adapter directory of the given kind; return (path, expected message fragment)."""
    path = make_adapter(base, root / "bad", 4, seed=9)
    weights = path / WEIGHTS
    if kind == "missing_config":
        (path / "adapter_config.json").unlink()
        return path, "missing .*adapter_config.json"
    if kind == "missing_weights":
        weights.unlink()
        return path, f"missing .*{WEIGHTS}"
    if kind == "pickle_only":
        torch.save(load_file(weights), path / "adapter_model.bin")
        weights.unlink()
        return path, "pickle"
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 100])
        return path, "truncated or corrupt"
    if kind == "nan":
        tensors = load_file(weights)
        key = _first_key(path, "B")
        tensors[key][0, 0] = float("nan")
        save_file(tensors, weights)
        return path, "NaN"
    if kind == "shape_mismatch":  # an adapter made for a wider model
        wide_tensors = {k: torch.randn(v.shape[0], 80) if "lora_A" in k else v for k, v in load_file(weights).items()}
        save_file(wide_tensors, weights)
        return path, "shape mismatch"
    if kind == "module_missing":
        tensors = {k.replace("layers.0.", "layers.7."): v for k, v in load_file(weights).items()}
        save_file(tensors, weights)
        return path, "lacks"
    if kind == "bad_json":
        (path / "adapter_config.json").write_text("{not json")
        return path, "not valid JSON"
    if kind == "dora":
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
        return path, "use_dora"
    if kind == "rank_disagrees":
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, "r": 6}))
        return path, "rank 4 but the config says r=6"
    if kind == "not_a_directory":
        return root / "nowhere", "not a directory"
    raise AssertionError(kind)


KINDS = ["missing_config", "missing_weights", "pickle_only", "truncated", "nan", "shape_mismatch", "module_missing",
         "bad_json", "dora", "rank_disagrees", "not_a_directory"]


@pytest.mark.parametrize("kind", KINDS)
def test_broken_adapter_fails_clearly_and_nothing_is_half_built(tmp_path, kind):
    base = tiny_base()
    good = make_adapter(base, tmp_path / "good", 8, seed=1)
    bad, message = _break(kind, base, tmp_path)
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(AdapterError, match=message) as caught:
        MeteoraModel.from_adapters(base, {"good": good, "broken": bad})
    assert "'broken'" in str(caught.value), "the message names the adapter"
    assert not any(isinstance(m, MeteoraLinear) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert all(p.requires_grad for p in base.parameters()), "a failed build leaves the base untouched"


def test_pickle_is_never_loaded(tmp_path, monkeypatch):
    base = tiny_base()
    path, _ = _break("pickle_only", base, tmp_path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not be called"))
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter(path, name="legacy")


@pytest.mark.parametrize("adapters, top_k, message", [  # adapters: (expert name, which adapter dir)
    ([], 2, "no adapters"),
    ([("same", "a"), ("same", "b")], 1, "duplicate expert names"),
    ([("a", "a"), ("b", "b")], 3, "top_k=3 is larger than the number of experts"),
    ([("a", "a"), ("b", "b")], 0, "top_k must be a positive integer"),
    ([("Bad Name", "a")], 1, "name 'Bad Name' is invalid"),
])
def test_invalid_model_settings_fail_clearly(tmp_path, adapters, top_k, message):
    base = tiny_base()
    paths = {"a": make_adapter(base, tmp_path / "a", 4, seed=1), "b": make_adapter(base, tmp_path / "b", 4, seed=2)}
    with pytest.raises(ValueError, match=message):
        MeteoraModel.from_adapters(base, [(name, paths[key]) for name, key in adapters], top_k=top_k)
    assert not any(isinstance(m, MeteoraLinear) for m in base.modules())


def test_routing_settings_are_validated(tmp_path):
    base = tiny_base()
    model = MeteoraModel.from_adapters(base, {"a": make_adapter(base, tmp_path / "a", 4)}, top_k=1)
    with pytest.raises(ValueError, match="temperature"):
        model.configure(temperature=0)
    with pytest.raises(ValueError, match="unknown backend"):
        model.configure(backend="cuda-magic")
    with pytest.raises(UnknownExpert, match="unknown experts"):
        with model.force_experts(["zzz"]):
            pass
    with pytest.raises(InvalidRequest, match="distinct experts"):
        with model.force_experts(["a", "a"]):
            pass
    with pytest.raises(InvalidRequest, match="a list of expert names, got the string 'a'"):
        model.expert_ids("a")
    with pytest.raises(ValueError, match="already holds MeteoRA layers"):
        MeteoraModel.from_adapters(model.base_model, {"a": tmp_path / "a"}, top_k=1)
