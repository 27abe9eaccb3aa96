"""GPU benchmark of the fused mixture-of-LoRA kernels against the torch backend and a per-expert loop.

One adapted layer (d_in = d_out = 4096, bf16 by default), uniform top-2 routing over E experts of rank r:
  decode  T = 1, 2, 4, 8, 16, 32, 64        prefill  T = 2048, 4096
  E = 28 and 256, r = 8, 16, 64
Per case: median time of each variant (triton.testing.do_bench), the kernel's achieved GB/s (bytes = the
distinct picked experts' A and B rows + x read + the delta written) against the device's measured copy
bandwidth, the speedup over the torch backend, and the kernel's max error against the loop in fp32.
Targets on an H100: >= 60% of copy bandwidth at decode with many experts, >= 3x the torch backend at prefill.

    python benchmarks/bench_kernels.py [--dtype bf16|fp16|fp32] [--out benchmarks/results/kernels_<gpu>.json]
    python benchmarks/bench_kernels.py --smoke --out /tmp/k.json   # tiny, on CPU under TRITON_INTERPRET=1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402

import meteora_moe.kernels as kernels  # noqa: E402
from meteora_moe import ExpertStack, LoraModule  # noqa: E402
from meteora_moe import BACKENDS  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FULL = {"d": 4096, "experts": [28, 256], "ranks": [8, 16, 64], "decode": [1, 2, 4, 8, 16, 32, 64], "prefill": [2048, 4096]}
TINY = {"d": 96, "experts": [6], "ranks": [8], "decode": [1, 3], "prefill": [80]}


def time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def copy_bandwidth_gbps(device: torch.device, n_bytes: int) -> float:
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * n_bytes / time_ms(lambda: dst.copy_(src), device) / 1e6  # read + write


def make_stack(n_experts: int, rank: int, d: int, dtype: torch.dtype, device: torch.device) -> ExpertStack:
    g = torch.Generator().manual_seed(n_experts * 1000 + rank)
    modules = [LoraModule(torch.randn(rank, d, generator=g) / d**0.5, torch.randn(d, rank, generator=g) / rank**0.5, 1.0)
               for _ in range(n_experts)]
    return ExpertStack.from_modules(modules, dtype).to(device)


def bench_case(stack: ExpertStack, tokens: int, dtype: torch.dtype, device: torch.device, loop: bool) -> dict:
    d = stack.A.shape[1]
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, d, generator=g).to(device, dtype)
    ids = torch.stack([torch.randperm(stack.num_experts, generator=g)[:2] for _ in range(tokens)]).to(device)
    weights = torch.softmax(torch.randn(tokens, 2, generator=g), -1).to(device)

    def fused():
        return kernels.mixture_lora_delta(x, ids, weights, stack.A, stack.B_t, stack.ranks, stack.offsets, stack.r_max)

    variants = {"triton": fused, "torch": lambda: BACKENDS["torch"](x, ids, weights, stack)}
    if loop:
        variants["loop"] = lambda: BACKENDS["loop"](x, ids, weights, stack)
    ms = {name: time_ms(fn, device) for name, fn in variants.items()}
    distinct = torch.unique(ids).numel()
    element = stack.A.element_size()
    moved = distinct * stack.r_max * 2 * d * element + tokens * 2 * d * element
    reference = BACKENDS["loop"](x.float(), ids, weights, stack)  # fp32 math on the same stored weights
    error = ((fused().float() - reference).abs().max() / reference.abs().max()).item()
    return {"tokens": tokens, "distinct_experts": distinct, "ms": ms, "bytes": moved,
            "triton_gbps": moved / ms["triton"] / 1e6, "speedup_vs_torch": ms["torch"] / ms["triton"],
            "max_relative_error_vs_loop": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--no-loop", action="store_true", help="skip the per-expert loop (slow at 256 experts)")
    args = parser.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (or --smoke to check the script on CPU under the interpreter)")
    device = torch.device("cpu" if SMOKE else "cuda")
    dtype = torch.float32 if SMOKE else DTYPES[args.dtype]  # the interpreter's bf16 arithmetic is wrong
    plan = TINY if SMOKE else FULL
    copy_gbps = copy_bandwidth_gbps(device, 2**24 if SMOKE else 2**30)
    rows = []
    for n_experts in plan["experts"]:
        for rank in plan["ranks"]:
            stack = make_stack(n_experts, rank, plan["d"], dtype, device)
            for regime in ("decode", "prefill"):
                for tokens in plan[regime]:
                    row = {"regime": regime, "experts": n_experts, "rank": rank,
                           **bench_case(stack, tokens, dtype, device, loop=not args.no_loop)}
                    row["fraction_of_copy_bandwidth"] = row["triton_gbps"] / copy_gbps
                    rows.append(row)
                    print(f"{regime:8} E={n_experts:<4} r={rank:<3} T={tokens:<5} triton {row['ms']['triton']:.3f} ms "
                          f"({row['triton_gbps']:.0f} GB/s, {row['fraction_of_copy_bandwidth']:.0%} of copy), "
                          f"{row['speedup_vs_torch']:.2f}x torch, err {row['max_relative_error_vs_loop']:.1e}",
                          file=sys.stderr)
    many = max(plan["experts"])
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter smoke run)",
                    "torch": torch.__version__, "triton": triton.__version__},
        "dtype": str(dtype), "d_in": plan["d"], "d_out": plan["d"], "top_k": 2,
        "launch_configs": {"DECODE": kernels.configs.DECODE, "PREFILL": kernels.configs.PREFILL,
                           "DECODE_MAX_TOKENS": kernels.configs.DECODE_MAX_TOKENS},
        "copy_bandwidth_gbps": copy_gbps,
        "summary": {
            "decode_fraction_of_copy_min_at_many_experts": min(
                r["fraction_of_copy_bandwidth"] for r in rows if r["regime"] == "decode" and r["experts"] == many),
            "prefill_speedup_vs_torch_min": min(r["speedup_vs_torch"] for r in rows if r["regime"] == "prefill"),
        },
        "rows": rows,
    }
    gpu = result["machine"]["device"].lower().replace(" ", "_")
    out = Path(args.out or f"benchmarks/results/kernels_{gpu}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
