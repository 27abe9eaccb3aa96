"""The Triton kernels (run by the interpreter on CPU) against a float64 reference of the mixture delta.

The interpreter's bf16 arithmetic is wrong (numpy has no bf16), so fp32 and fp16 are tested here; bf16
needs a GPU (benchmarks/bench_kernels.py checks it there).
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import meteora_moe.kernels as kernels
from meteora_moe import ExpertStack, LoraModule, MeteoraModel
from tiny import ALL_MODULES, make_adapter, random_ids, tiny_base

D_IN, D_OUT = 100, 136  # not multiples of any block size
RANKS = [4, 16, 0, 8, 2, 72]  # heterogeneous, one expert targets nothing here, one above a 64-row rank tile
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3}  # max error relative to the largest output


def _stack(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    modules = [None if r == 0 else LoraModule(torch.randn(r, D_IN, generator=g) / 4, torch.randn(D_OUT, r, generator=g) / 4,
                                             0.5 + e / 2) for e, r in enumerate(RANKS)]
    return ExpertStack.from_modules(modules, dtype)


def _reference(x, ids, weights, stack):
    """sum_j w_j * B_t[rows_e].T @ (A[rows_e] @ x), in float64 from the very tensors the kernel reads."""
    out = torch.zeros(x.shape[0], stack.B_t.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            A_e, B_e_t = stack.expert(int(ids[t, j]))
            out[t] += weights[t, j].double() * (B_e_t.double().t() @ (A_e.double() @ x[t].double()))
    return out


def _routing(tokens, k, choices, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([choices[torch.randperm(len(choices), generator=g)[:k]] for _ in range(tokens)])  # [T, k]
    return ids, torch.softmax(torch.randn(tokens, k, generator=g), -1)


def _run(x, ids, weights, stack):
    out = torch.full((x.shape[0], D_OUT), float("nan"), dtype=x.dtype)  # poisoned: every element must be written
    kernels.mixture_lora_delta(x, ids, weights, stack.A, stack.B_t, stack.ranks, stack.offsets, stack.r_max, out=out)
    return out


def _relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [1, 5, 64, 300])  # 1-64: gathered (decode) kernels, 300: grouped (prefill)
@pytest.mark.parametrize("k", [1, 2])
def test_kernel_matches_float64_reference(dtype, tokens, k):
    stack = _stack(dtype)
    x = torch.randn(tokens, D_IN, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    ids, weights = _routing(tokens, k, torch.tensor([0, 1, 2, 3, 5]), seed=k)  # expert 4 is picked by no token
    out = _run(x, ids, weights, stack)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert _relative_error(out, _reference(x, ids, weights, stack)) < TOLERANCE[dtype]


@pytest.mark.parametrize("tokens", [3, 200])
@pytest.mark.parametrize("expert", [5, 2])  # the rank-72 expert, then the rank-0 one (delta exactly zero)
def test_all_tokens_on_one_expert(tokens, expert):
    stack = _stack(torch.float32)
    x = torch.randn(tokens, D_IN)
    ids, weights = torch.full((tokens, 1), expert), torch.ones(tokens, 1)
    out = _run(x, ids, weights, stack)
    expected = _reference(x, ids, weights, stack)
    if RANKS[expert] == 0:
        assert torch.equal(out, torch.zeros_like(out))
    else:
        assert _relative_error(out, expected) < 1e-5


def test_both_regimes_agree_and_grouped_blocks_cover_every_slot():
    stack = _stack(torch.float32)
    x = torch.randn(40, D_IN)
    ids, weights = _routing(40, 2, torch.arange(6), seed=3)
    outputs = []
    for delta in (kernels.gathered_delta, kernels.grouped_delta):
        out = torch.full((40, D_OUT), float("nan"))
        delta(x, ids, weights, stack.A, stack.B_t, stack.ranks, stack.offsets, stack.r_max, out)
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_expert_blocks_follow_the_worked_example():
    blocks = kernels.grouped.ExpertBlocks.make(torch.tensor([[2, 0], [2, 1], [0, 2]]), num_experts=3, block_m=2)
    assert blocks.sorted_slots.tolist() == [1, 4, 3, 0, 2, 5]
    assert blocks.block_expert.tolist() == [0, 1, 2, 2, 3, 3]
    assert blocks.block_start[:4].tolist() == [0, 2, 3, 5] and blocks.block_end[:4].tolist() == [2, 3, 5, 6]


def test_bad_arguments_are_refused():
    stack = _stack(torch.float32)
    ids, weights = torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2)
    with pytest.raises(ValueError, match="must both be"):
        kernels.mixture_lora_delta(torch.randn(4, D_IN), ids[:3], weights, stack.A, stack.B_t, stack.ranks,
                                   stack.offsets, stack.r_max)
    with pytest.raises(ValueError, match="dtypes"):
        kernels.mixture_lora_delta(torch.randn(4, D_IN).double(), ids, weights, stack.A, stack.B_t, stack.ranks,
                                   stack.offsets, stack.r_max)
    for out in (torch.empty(4, D_OUT + 1), torch.empty(D_OUT, 4).t()):  # the wrong shape; not contiguous
        with pytest.raises(ValueError, match="out must be a contiguous"):
            kernels.mixture_lora_delta(torch.randn(4, D_IN), ids, weights, stack.A, stack.B_t, stack.ranks,
                                       stack.offsets, stack.r_max, out=out)
    with pytest.raises(ValueError, match="one device"):
        kernels.mixture_lora_delta(torch.randn(4, D_IN), ids.to("meta"), weights, stack.A, stack.B_t, stack.ranks,
                                   stack.offsets, stack.r_max)


@pytest.mark.parametrize("length", [6, 40])  # 2 x 6 tokens: gathered kernels; 2 x 40: grouped kernels
def test_triton_model_matches_loop_model(tmp_path, length):
    base = tiny_base()
    specs = [(4, ALL_MODULES), (8, ["q_proj", "v_proj"]), (16, ALL_MODULES), (2, ["up_proj", "down_proj"])]
    paths = {f"e{i}": make_adapter(base, tmp_path / f"e{i}", r, 2 * r, t, seed=i) for i, (r, t) in enumerate(specs)}
    models = {b: MeteoraModel.from_adapters(copy.deepcopy(base), paths, top_k=2, backend=b, seed=1) for b in ("loop", "triton")}
    ids = random_ids(batch=2, length=length)
    with torch.no_grad():
        logits = {b: m(ids).logits for b, m in models.items()}
    assert _relative_error(logits["triton"], logits["loop"].double()) < 1e-5


def test_auto_picks_torch_on_cpu_and_triton_refuses_training(tmp_path):
    base = tiny_base()
    model = MeteoraModel.from_adapters(base, {"a": make_adapter(base, tmp_path / "a", 4)}, top_k=1, backend="triton")
    with pytest.raises(RuntimeError, match="inference-only"):
        model(random_ids())
    model.configure(backend="auto")
    model(random_ids()).logits.sum().backward()  # auto on CPU: the torch backend, which trains
    assert model.gate_parameters()[0].grad is not None


def test_gpu_benchmark_script_runs_in_smoke_mode(tmp_path):
    """The GPU benchmark stays runnable: its --smoke mode runs every path on CPU under the interpreter."""
    out = tmp_path / "kernels.json"
    script = Path(__file__).parents[2] / "benchmarks" / "bench_kernels.py"
    subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert {r["regime"] for r in result["rows"]} == {"decode", "prefill"}
    assert all(r["max_relative_error_vs_loop"] < 1e-5 and set(r["ms"]) == {"triton", "torch", "loop"} for r in result["rows"])


def test_meteora_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None  # any 'import triton' now fails\n"
        "import copy, torch, tempfile, pathlib, meteora_moe\n"
        "from tiny import tiny_base, make_adapter, random_ids\n"
        "base = tiny_base(); path = make_adapter(base, pathlib.Path(tempfile.mkdtemp()) / 'a', 4)\n"
        "model = meteora_moe.MeteoraModel.from_adapters(base, {'a': path}, top_k=1)\n"
        "assert 'triton' not in sys.modules or sys.modules['triton'] is None\n"
        "print(model(random_ids()).logits.shape)\n"
    )
    tests = Path(__file__).parents[1]  # tiny.py
    done = subprocess.run([sys.executable, "-c", code], cwd=tests, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tests)})
    assert done.returncode == 0, done.stderr
    assert "torch.Size([2, 10, 96])" in done.stdout
