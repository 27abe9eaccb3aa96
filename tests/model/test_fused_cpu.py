"""The fused CPU call (meteora/model/backends/fused_cpu.c): one layer's routing and experts' delta, built with the
machine's C compiler, which `auto` takes for CPU inference. It matches a float64 reference of the whole layer (gate,
top-k, softmax, delta), fp32 and bf16 experts, at any temperature, one token or many (shared among threads); it
generates as the loop backend does; training and forced experts keep the torch backend; a machine without a
compiler keeps the torch backend with the same outputs."""
import copy

import pytest
import torch
from torch import nn

from meteora_moe import ExpertStack, LoraModule, MeteoraModel
from meteora_moe.model import MeteoraLinear, Routing, backends
from tiny import ALL_MODULES, make_adapter, random_ids, tiny_base

fused_cpu = backends.fused_cpu
RANKS = ([4, 16, 0, 8, 2, 32], [4] * 12 + [2] * 8)  # one expert not targeting the layer; many small ones


def _layer(ranks, top_k, temperature, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    modules = [None if r == 0 else LoraModule(torch.randn(r, 48, generator=g), torch.randn(40, r, generator=g), 0.5 + e)
               for e, r in enumerate(ranks)]
    base = nn.Linear(48, 40)
    gate = torch.randn(len(ranks), 48, generator=g)
    routing = Routing(top_k, temperature, "auto")
    return MeteoraLinear("layer", base, ExpertStack.from_modules(modules, dtype), routing, gate=gate)


def _reference(layer: MeteoraLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer in float64: base output plus the routed delta from the stack's stored factors; and the picked ids."""
    x64, routing, experts = x.double(), layer.routing, layer.meteora_experts
    logits = x64 @ layer.meteora_gate.double().t()  # [T, E]
    values, ids = logits.topk(routing.top_k, dim=-1)
    weights = torch.softmax(values / routing.temperature, dim=-1)
    out = x64 @ layer.base_layer.weight.double().t() + layer.base_layer.bias.double()
    for t in range(x.shape[0]):
        for j in range(routing.top_k):
            A_e, B_e_t = experts.expert(int(ids[t, j]))
            out[t] += weights[t, j] * (B_e_t.double().t() @ (A_e.double() @ x64[t]))
    return out, ids


@pytest.mark.parametrize("tokens", [1, 7, 300])  # 300: shared among the OpenMP threads
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_layer_matches_a_float64_reference(tokens, k, ranks, dtype):
    layer = _layer(ranks, k, temperature=2.0 if k == 2 else 1.0, dtype=dtype)
    x = torch.randn(tokens, 48, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad(), layer.routing.recording(["layer"], [str(e) for e in range(len(ranks))]) as recorder:
        out = layer(x)
    expected, ids = _reference(layer, x)
    assert fused_cpu.fused_available() and out.dtype == torch.float32
    assert torch.equal(recorder.calls["layer"][0][0], ids)  # it routed as float64 does
    assert ((out.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5


def _models(tmp_path, backends):
    base = tiny_base()
    specs = [(4, ALL_MODULES), (8, ["q_proj", "v_proj"]), (16, ALL_MODULES), (2, ["up_proj", "down_proj"])]
    paths = {f"e{i}": make_adapter(base, tmp_path / f"e{i}", r, 2 * r, t, seed=i) for i, (r, t) in enumerate(specs)}
    return [MeteoraModel.from_adapters(copy.deepcopy(base), paths, top_k=2, backend=b, seed=7) for b in backends]


def test_auto_takes_the_fused_call_for_the_prompt_and_every_step_and_generates_as_the_loop_does(tmp_path, monkeypatch):
    loop_model, auto_model = _models(tmp_path, ("loop", "auto"))
    sizes = []

    fused_delta = fused_cpu.add_fused_delta

    def counted(layer, x, y):
        fused = fused_delta(layer, x, y)
        if fused:
            sizes.append(x.numel() // x.shape[-1])
        return fused

    monkeypatch.setattr(fused_cpu, "add_fused_delta", counted)
    prompt = random_ids(batch=2, length=40)
    with torch.no_grad():
        out = auto_model.generate(prompt, max_new_tokens=4, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True, pad_token_id=0)
        reference = loop_model.generate(prompt, max_new_tokens=4, do_sample=False, output_scores=True,
                                        return_dict_in_generate=True, pad_token_id=0)
    layers = len(auto_model.layer_names)
    assert sizes == [80] * layers + [2] * 3 * layers  # the prompt (2 x 40 tokens), then 3 steps of 2, every layer
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(reference.scores), rtol=1e-4, atol=1e-4)


def test_training_and_forced_experts_keep_the_torch_backend(tmp_path):
    fused_model, torch_model = _models(tmp_path, ("auto", "torch"))
    ids = random_ids(batch=1, length=5)
    for model in (fused_model, torch_model):
        model.base_model.zero_grad()
    losses = [model(ids).logits.square().mean() for model in (fused_model, torch_model)]
    for loss in losses:
        loss.backward()
    for a, b in zip(fused_model.gate_parameters(), torch_model.gate_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)  # a gradient reached every gate
    with torch.no_grad(), fused_model.force_experts(["e1"]), torch_model.force_experts(["e1"]):
        torch.testing.assert_close(fused_model(ids).logits, torch_model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiler", ["no-such-compiler", "false"])  # none found; one that fails
def test_without_a_working_c_compiler_the_torch_backend_serves_the_same_outputs(tmp_path, monkeypatch, compiler):
    torch_model, auto_model = _models(tmp_path, ("torch", "auto"))
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv("METEORA_CACHE", str(tmp_path / "cache"))  # no library built before
    fused_cpu._library.cache_clear()
    try:
        assert not fused_cpu.fused_available()
        with torch.no_grad():
            ids = random_ids(batch=1, length=1)
            torch.testing.assert_close(auto_model(ids).logits, torch_model(ids).logits, rtol=1e-5, atol=1e-5)
    finally:
        fused_cpu._library.cache_clear()
    assert not list((tmp_path / "cache").rglob("*.so"))
