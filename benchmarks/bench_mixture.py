"""Side-by-side speed of the fused model on CPU: base, PEFT with one adapter, MeteoRA's loop, torch and auto paths
(auto: one native call per layer, meteora/model/backends/fused_cpu.py).

A Llama-shaped random model (hidden 1024, intermediate 2816, 4 layers, vocab 32000, fp32) with 28 PEFT
adapters on all seven projections, top-2 routing; also 28 and 112 adapters of mixed ranks. Measured in ONE run,
variants interleaved per repeat so machine noise hits them alike; medians of the repeats; ratios against
PEFT-with-one-adapter.
  decode  batch 8 and batch 1: 128-token prompt, then N single-token steps with the KV cache (tokens/s)
  prefill batch 8 x 128 tokens, logits of the last position only, as in generate (tokens/s)
Also: the same with heterogeneous ranks (4, 8, 16, 32 in turn; 28 and 112 experts), distinct experts read per
decode step, and the experts' resident memory against the sum of the adapter files.

    python benchmarks/bench_mixture.py [--repeats 3] [--new-tokens 32] [--out benchmarks/results/mixture_cpu.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from meteora_moe import MeteoraModel

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_EXPERTS = 28
MANY_EXPERTS = 112  # the mixed ranks again, four times as many experts: how the cost grows with them


def build_base(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def write_adapter(base: torch.nn.Module, path: Path, rank: int, seed: int) -> int:
    """A PEFT-format adapter (adapter_config.json + adapter_model.safetensors) with random factors; its size."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in base.named_modules():
        if name.rsplit(".", 1)[-1] in MODULES:
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) / 32
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) / 32
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": MODULES, "bias": "none",
              "task_type": "CAUSAL_LM", "use_rslora": False, "lora_dropout": 0.0}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return (path / "adapter_model.safetensors").stat().st_size


@torch.inference_mode()
def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    out = model(prompt, use_cache=True, logits_to_keep=1)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    return prompt.shape[0] * new_tokens / (time.perf_counter() - start)


@torch.inference_mode()
def prefill_tokens_per_s(model, prompt: torch.Tensor) -> float:
    start = time.perf_counter()
    model(prompt, use_cache=True, logits_to_keep=1)
    return prompt.numel() / (time.perf_counter() - start)


@torch.inference_mode()
def distinct_experts_per_step(model: MeteoraModel, prompt: torch.Tensor) -> float:
    """Mean over adapted layers of how many distinct experts one decode step's tokens pick."""
    out = model(prompt, use_cache=True, logits_to_keep=1)
    with model.recording_routing() as recorder:
        model(out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
    return statistics.mean(len(torch.unique(calls[0][0])) for calls in recorder.calls.values())


def side_by_side(variants: dict, scenarios: dict, warm_up: torch.Tensor, repeats: int) -> dict:
    """{variant: {scenario: [tokens/s per repeat]}}: variant(fn, *args) runs scenario (fn, *args) on its model; the
    variants interleaved within each repeat, so machine noise hits them alike; one prefill of `warm_up` first."""
    for run in variants.values():
        run(prefill_tokens_per_s, warm_up)
    samples = {v: {s: [] for s in scenarios} for v in variants}
    for repeat in range(repeats):
        for scenario, (fn, *args) in scenarios.items():
            for name, run in variants.items():
                samples[name][scenario].append(run(fn, *args))
        print(f"repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)
    return samples


def ratios_to_peft(samples: dict) -> dict:
    """Medians of the samples and their ratios to PEFT with one adapter's."""
    medians = {v: {s: round(statistics.median(x), 1) for s, x in per.items()} for v, per in samples.items()}
    return {"tokens_per_s_median": medians,
            "ratio_to_peft_one_adapter": {v: {s: round(medians[v][s] / medians["peft_one_adapter"][s], 3) for s in per}
                                          for v, per in medians.items()}}


def experts_bytes(model: MeteoraModel) -> int:
    return sum(layer.meteora_experts.A.nbytes + layer.meteora_experts.B_t.nbytes for layer in model.layers.values())


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    return {"cpu": cpu, "isa": torch.backends.cpu.get_cpu_capability(), "amx": "amx_bf16" in flags,  # bf16 speed
            "cores": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/mixture_cpu.json")
    args = parser.parse_args()

    base = build_base()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uniform = {f"r8-{i:02d}": root / f"r8-{i:02d}" for i in range(N_EXPERTS)}
        mixed = {f"mixed-{i:03d}": root / f"mixed-{i:03d}" for i in range(MANY_EXPERTS)}
        uniform_bytes = sum(write_adapter(base, p, 8, seed=i) for i, p in enumerate(uniform.values()))
        mixed_bytes = [write_adapter(base, p, (4, 8, 16, 32)[i % 4], seed=100 + i) for i, p in enumerate(mixed.values())]
        peft = PeftModel.from_pretrained(copy.deepcopy(base), uniform["r8-00"]).eval()
        fused = MeteoraModel.from_adapters(copy.deepcopy(base), uniform, top_k=2, backend="torch")
        fused_mixed = MeteoraModel.from_adapters(copy.deepcopy(base), dict(list(mixed.items())[:N_EXPERTS]), top_k=2,
                                                 backend="torch")
        fused_many = MeteoraModel.from_adapters(copy.deepcopy(base), mixed, top_k=2, backend="torch")

    def backend(model, name):
        def run(fn, *a):
            model.configure(backend=name)
            return fn(model, *a)
        return run

    variants = {
        "base": lambda fn, *a: fn(base, *a),
        "peft_one_adapter": lambda fn, *a: fn(peft, *a),
        "meteora_loop": backend(fused, "loop"),
        "meteora_torch": backend(fused, "torch"),
        "meteora_auto": backend(fused, "auto"),
        "meteora_torch_mixed_ranks": backend(fused_mixed, "torch"),
        "meteora_auto_mixed_ranks": backend(fused_mixed, "auto"),
        f"meteora_torch_{MANY_EXPERTS}_mixed_ranks": backend(fused_many, "torch"),
        f"meteora_auto_{MANY_EXPERTS}_mixed_ranks": backend(fused_many, "auto"),
    }
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, 32000, (b, 128), generator=g) for b in (8, 1)}
    scenarios = {
        "decode_batch8": (decode_tokens_per_s, prompts[8], args.new_tokens),
        "decode_batch1": (decode_tokens_per_s, prompts[1], args.new_tokens),
        "prefill_batch8x128": (prefill_tokens_per_s, prompts[8]),
    }
    samples = side_by_side(variants, scenarios, prompts[1], args.repeats)
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "setup": {"hidden": 1024, "intermediate": 2816, "layers": 4, "vocab": 32000, "dtype": "float32",
                  "experts": N_EXPERTS, "many_experts": MANY_EXPERTS, "top_k": 2, "modules": MODULES, "prompt_tokens": 128,
                  "new_tokens": args.new_tokens, "repeats": args.repeats, "mixed_ranks": [4, 8, 16, 32]},
        **ratios_to_peft(samples),  # the mixed-rank variants too are divided by PEFT with one rank-8 adapter
        "distinct_experts_per_decode_step": {"batch8": distinct_experts_per_step(fused, prompts[8]),
                                             "batch1": distinct_experts_per_step(fused, prompts[1])},
        "experts_memory_vs_adapter_files": {
            "uniform_r8": round(experts_bytes(fused) / uniform_bytes, 4),
            "mixed_ranks": round(experts_bytes(fused_mixed) / sum(mixed_bytes[:N_EXPERTS]), 4),
            f"{MANY_EXPERTS}_mixed_ranks": round(experts_bytes(fused_many) / sum(mixed_bytes), 4),
        },
        "samples": samples,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("tokens_per_s_median", "ratio_to_peft_one_adapter",
                                             "distinct_experts_per_decode_step", "experts_memory_vs_adapter_files")}, indent=2))


if __name__ == "__main__":
    main()
