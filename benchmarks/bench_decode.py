"""Decode and prefill speed on the real model, side by side in one run: the base, PEFT with one adapter, and MeteoRA
with every chattasks adapter (SmolLM2-135M-Instruct, 12 experts of ranks 4-16 on attention and MLP projections,
210 adapted layers, top-2) through each CPU path: `torch` (the vectorized ops) and `auto` (one native call per
layer, meteora/model/backends/fused_cpu.py). Gates are freshly initialised (speed does not depend on what they learned:
every token takes 2 experts either way); prompts are random tokens.
  decode   batch 1 and 8: a 128-token prompt, then --new-tokens single-token steps with the KV cache (tokens/s)
  prefill  8 x 128 tokens (tokens/s)
Variants interleaved per repeat so machine noise hits them alike; medians of --repeats; ratios to PEFT.

    python benchmarks/bench_decode.py [--repeats 5] [--new-tokens 32] [--out benchmarks/results/decode/real_model.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402

from bench_mixture import decode_tokens_per_s, machine, prefill_tokens_per_s, ratios_to_peft, side_by_side  # noqa: E402
from meteora_moe import MeteoraModel, load_base_model  # noqa: E402
from meteora_moe.registry import load_manifest  # noqa: E402
from suites.chattasks import build  # noqa: E402


def with_backend(model: MeteoraModel, backend: str):
    def run(fn, *args):
        model.configure(backend=backend)
        return fn(model, *args)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/decode/real_model.json")
    args = parser.parse_args()

    manifest = load_manifest(build())
    adapters = {a.name: a.uri for a in manifest.adapters}
    base = load_base_model(manifest.base_uri).eval()
    fused = MeteoraModel.from_adapters(copy.deepcopy(base), adapters, top_k=2).eval()
    ranks = {e.name: e.rank for e in fused.experts}
    peft_adapter = max(ranks, key=ranks.get)  # the highest rank: PEFT's slowest single adapter
    peft = PeftModel.from_pretrained(copy.deepcopy(base), adapters[peft_adapter]).eval()
    variants = {"base": lambda fn, *a: fn(base, *a), "peft_one_adapter": lambda fn, *a: fn(peft, *a),
                "meteora_torch": with_backend(fused, "torch"), "meteora_auto": with_backend(fused, "auto")}
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, base.config.vocab_size, (b, 128), generator=g) for b in (1, 8)}
    scenarios = {"decode_batch1": (decode_tokens_per_s, prompts[1], args.new_tokens),
                 "decode_batch8": (decode_tokens_per_s, prompts[8], args.new_tokens),
                 "prefill_batch8x128": (prefill_tokens_per_s, prompts[8])}
    samples = side_by_side(variants, scenarios, prompts[1], args.repeats)
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(),
              "setup": {"model": manifest.base_name, "experts": len(ranks), "ranks": ranks,
                        "adapted_layers": len(fused.layer_names), "top_k": 2, "peft_adapter": peft_adapter,
                        "prompt_tokens": 128, "new_tokens": args.new_tokens, "repeats": args.repeats,
                        "dtype": str(next(base.parameters()).dtype)},
              **ratios_to_peft(samples), "samples": samples}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("tokens_per_s_median", "ratio_to_peft_one_adapter")}, indent=2))


if __name__ == "__main__":
    main()
