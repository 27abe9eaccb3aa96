"""The `loop` and `torch` backends agree with a float64 reference and with each other."""
import copy

import pytest
import torch

from meteora_moe import BACKENDS, ExpertStack, LoraModule, MeteoraModel
from meteora_moe.model import backends
from tiny import ALL_MODULES, make_adapter, random_ids, tiny_base


def _stack(ranks, d_in=48, d_out=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    modules = [None if r == 0 else LoraModule(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 0.5 + e)
               for e, r in enumerate(ranks)]
    return ExpertStack.from_modules(modules, torch.float32), modules


def _reference(x, ids, weights, modules):
    """The layer's formula in float64, one token and one pick at a time."""
    out = torch.zeros(x.shape[0], next(m for m in modules if m).B.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            m = modules[ids[t, j]]
            if m is not None:
                out[t] += weights[t, j].double() * m.scaling * (m.B.double() @ (m.A.double() @ x[t].double()))
    return out


def _max_relative(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


# heterogeneous with one expert not targeting this layer; many small experts (the torch backend's gathered form
# at 1 token: the picked rows are under half of A's)
RANKS = ([4, 16, 0, 8, 2, 32], [4] * 12 + [2] * 8)


@pytest.mark.parametrize("backend", ["loop", "torch"])
@pytest.mark.parametrize("tokens", [1, 7, 300])  # dense at 7, grouped at 300 (300 * R > DENSE_SHRINK_MAX)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("ranks", RANKS)
def test_backend_matches_float64_reference(backend, tokens, k, ranks):
    stack, modules = _stack(ranks)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 48, generator=g)
    ids = torch.stack([torch.randperm(len(ranks), generator=g)[:k] for _ in range(tokens)])  # [T, k]
    weights = torch.softmax(torch.randn(tokens, k, generator=g), -1)
    delta = BACKENDS[backend](x, ids, weights, stack)
    expected = _reference(x, ids, weights, modules)
    assert delta.dtype == torch.float32
    assert _max_relative(delta, expected) < 1e-5


@pytest.mark.parametrize("backend", ["loop", "torch"])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("ranks", RANKS)
def test_bf16_experts_accumulate_in_fp32(backend, tokens, ranks):
    """bf16 experts and activations: the delta is computed in fp32 from their exact bf16 values, so it matches a
    float64 reference on the same values to fp32 precision (1e-5 relative), not bf16's ~4e-3."""
    stack, modules = _stack(ranks)
    stack_bf16 = ExpertStack.from_modules(modules, torch.bfloat16)
    rounded = [None if m is None else LoraModule(m.A.bfloat16().float(), m.B.bfloat16().float(), m.scaling) for m in modules]
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 48, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(len(ranks), generator=g)[:2] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 2, generator=g), -1)
    delta = BACKENDS[backend](x, ids, weights, stack_bf16)
    # the stack holds scaling * B^T rounded to bf16 once: the reference takes the same rounded product
    expected = _reference_stacked(x.double(), ids, weights, stack_bf16)
    assert delta.dtype == torch.float32
    assert _max_relative(delta, expected) < 1e-5
    assert _max_relative(delta, _reference(x.float(), ids, weights, rounded)) < 2e-2  # and near the unrounded formula


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaling_is_folded_in_fp32_and_rounded_once(dtype):
    """A bf16 adapter in an fp32 base keeps scaling * B exact in fp32; in a bf16 base the bits are as before
    (bf16 arithmetic rounds its fp32 product once too)."""
    g = torch.Generator().manual_seed(0)
    modules = [LoraModule(torch.randn(4, 48, generator=g).bfloat16(), torch.randn(40, 4, generator=g).bfloat16(), s)
               for s in (0.37, 16 / 8 ** 0.5)]
    stack = ExpertStack.from_modules(modules, dtype)
    for e, m in enumerate(modules):
        _, B_t = stack.expert(e)
        assert torch.equal(B_t, (m.B.float().t() * m.scaling).to(dtype))
        if dtype == torch.bfloat16:
            assert torch.equal(B_t, m.scaling * m.B.t())


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_no_tokens_give_an_empty_delta(backend):
    stack, _ = _stack(RANKS[0])
    delta = BACKENDS[backend](torch.zeros(0, 48), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2), stack)
    assert delta.shape == (0, 40) and delta.dtype == torch.float32


def _reference_stacked(x, ids, weights, stack):
    """The formula in float64 from the stack's own stored factors (A_e and scaling_e * B_e^T as stored)."""
    out = torch.zeros(x.shape[0], stack.B_t.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            A_e, B_e_t = stack.expert(int(ids[t, j]))
            out[t] += weights[t, j].double() * (B_e_t.double().t() @ (A_e.double() @ x[t]))
    return out


@pytest.mark.parametrize("tokens", [3, 64, 500])
def test_dense_and_grouped_shrink_agree_when_all_tokens_pick_one_expert(tokens, monkeypatch):
    stack, modules = _stack([8, 4, 8])
    x = torch.randn(tokens, 48)
    ids = torch.full((tokens, 1), 1)
    weights = torch.ones(tokens, 1)
    results = []
    for limit in (0, 10**9):  # force grouped, then dense
        monkeypatch.setattr(backends.vectorized, "DENSE_SHRINK_MAX", limit)
        results.append(BACKENDS["torch"](x, ids, weights, stack))
    expected = _reference(x, ids, weights, modules)
    assert _max_relative(results[0], expected) < 1e-5 and _max_relative(results[1], expected) < 1e-5


def _fused_pair(tmp_path, top_k, arch="llama", attn="eager"):
    base = tiny_base(arch, attn)
    specs = [(4, ALL_MODULES), (8, ["q_proj", "v_proj"]), (16, ALL_MODULES), (2, ["up_proj", "down_proj"])]
    paths = {f"e{i}": make_adapter(base, tmp_path / f"e{i}", r, 2 * r, t, seed=i) for i, (r, t) in enumerate(specs)}
    return [MeteoraModel.from_adapters(copy.deepcopy(base), paths, top_k=top_k, backend=b, seed=7) for b in ("loop", "torch")]


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_loop_and_torch_models_agree_with_random_gates(tmp_path, top_k, attn):
    loop_model, torch_model = _fused_pair(tmp_path, top_k, attn=attn)
    ids = random_ids(batch=3, length=40)
    with torch.no_grad():
        torch.testing.assert_close(torch_model(ids).logits, loop_model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_backends_agree_in_generation_with_and_without_kv_cache(tmp_path, top_k):
    models = _fused_pair(tmp_path, top_k)
    prompt = random_ids(batch=2, length=6, seed=3)
    runs = {}
    for backend, model in zip(("loop", "torch"), models):
        for cache in (True, False):
            out = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=cache, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=0)
            runs[backend, cache] = out
    reference = runs["loop", False]
    for key, out in runs.items():
        assert torch.equal(out.sequences, reference.sequences), key
        torch.testing.assert_close(torch.stack(out.scores), torch.stack(reference.scores), rtol=1e-4, atol=1e-4)


def test_a_model_cast_to_bf16_still_routes(tmp_path):
    base = tiny_base()
    model = MeteoraModel.from_adapters(base, {"a": make_adapter(base, tmp_path / "a", 4, seed=1),
                                              "b": make_adapter(base, tmp_path / "b", 8, seed=2)}, top_k=2)
    model.to(torch.bfloat16)
    with torch.no_grad():
        logits = model(random_ids()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
