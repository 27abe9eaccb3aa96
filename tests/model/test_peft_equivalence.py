"""With one expert forced, the fused model must compute exactly what peft computes with that adapter."""
import copy
import json

import pytest
import torch
from peft import PeftModel

from meteora_moe import MeteoraModel, load_adapter
from tiny import ALL_MODULES, make_adapter, random_ids, tiny_base

ADAPTERS = {  # name -> (rank, alpha, targets, rsLoRA, extra LoraConfig fields)
    "r4-all": (4, 8, ALL_MODULES, False, {}),
    "r8-rslora": (8, 32, ["q_proj", "k_proj", "v_proj", "o_proj"], True, {}),
    "r16-qv": (16, 16, ["q_proj", "v_proj"], False, {}),
    "r8-patterns": (8, 16, ["q_proj", "down_proj"], False, {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 4}}),
}


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_forced_expert_matches_peft(tmp_path, arch, backend):
    base = tiny_base(arch)
    paths = {name: make_adapter(base, tmp_path / name, r, a, t, rs, seed=i, **extra)
             for i, (name, (r, a, t, rs, extra)) in enumerate(ADAPTERS.items())}
    ids = random_ids(batch=2, length=12)
    fused = MeteoraModel.from_adapters(copy.deepcopy(base), paths, top_k=2, backend=backend)
    with torch.no_grad():
        base_logits = base(ids).logits
        for name, path in paths.items():
            peft_logits = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()(ids).logits
            with fused.force_experts([name]):
                logits = fused(ids).logits
            assert _relative_error(peft_logits, base_logits) > 1e-3, "the adapter must change the outputs"
            assert _relative_error(logits, peft_logits) < 1e-5, name


def test_two_forced_experts_average_their_deltas(tmp_path):
    base = tiny_base()
    paths = {"a": make_adapter(base, tmp_path / "a", 4, seed=1), "b": make_adapter(base, tmp_path / "b", 8, seed=2)}
    fused = MeteoraModel.from_adapters(copy.deepcopy(base), paths)
    layer = fused.layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(5, 64)
    with torch.no_grad():
        with fused.force_experts(["a"]):
            delta_a = layer(x) - layer.base_layer(x)
        with fused.force_experts(["b"]):
            delta_b = layer(x) - layer.base_layer(x)
        with fused.force_experts(["a", "b"]):
            delta_ab = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(delta_ab, (delta_a + delta_b) / 2, rtol=1e-5, atol=1e-6)


def test_a_config_without_lora_alpha_scales_as_peft_does(tmp_path):
    """PEFT gives a config without lora_alpha LoraConfig's default alpha (8), not alpha = r."""
    base = tiny_base()
    path = make_adapter(base, tmp_path / "a", 4, 16, ALL_MODULES, seed=1)
    config = json.loads((path / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    assert load_adapter(path).alpha == 8
    ids = random_ids(batch=1, length=8)
    fused = MeteoraModel.from_adapters(copy.deepcopy(base), {"a": path}, top_k=1)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()(ids).logits
        assert _relative_error(fused(ids).logits, peft_logits) < 1e-5
