"""What eager attention for short rows (meteora.training.training_attention) buys a gate-training step on the real
model, side by side in one run: the 12-expert checkpoint of `make demo MODEL=smollm2` on a bf16 base (as the
benchmark trains), batches of 16 of the suite's train samples (a quarter composites of 3, as the benchmark's
gate training), the step as GateTrainer runs it (forward, CE_LM + 50 x CE_gate, backward); the two ways
interleaved, ROUNDS rounds of STEPS steps each, medians.

    PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/gate_attention.py CHECKPOINT SUITE_DIR
"""
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from meteora import MeteoraModel, load_tokenizer
from meteora.training import GateTrainingConfig, gate_batch, gate_step, training_attention

sys.path.insert(0, str(Path(__file__).parents[3]))  # benchmarks/
from bench_mixture import machine  # noqa: E402

checkpoint, suite = sys.argv[1], Path(sys.argv[2])
ROUNDS, STEPS = 3, 4


def step(model, batch, context) -> float:
    """One gate-training step's forward and backward, as GateTrainer runs it; its loss."""
    model.zero_grad()
    with context:
        return gate_step(model, batch, GateTrainingConfig())["loss"]


def main() -> None:
    model = MeteoraModel.from_pretrained(checkpoint, dtype=torch.bfloat16).train()
    tokenizer = load_tokenizer(next((suite / "base").glob("*.gguf")))
    samples = [(json.loads(line), i) for i, name in enumerate(model.expert_names)
               for line in (suite / "data" / name / "train.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    batches = [gate_batch(tokenizer, [rng.sample(samples, 3) if rng.random() < 0.25 else rng.choice(samples)
                                      for _ in range(16)], model.prompt_format) for _ in range(STEPS)]
    ways = {"SDPA": lambda shape: contextlib.nullcontext(),
            "eager for short rows": lambda shape: training_attention(model.base_model, shape)}
    step(model, batches[0], contextlib.nullcontext())  # warm-up
    seconds, losses = {way: [] for way in ways}, {way: [] for way in ways}
    for _ in range(ROUNDS):
        for way, context in ways.items():
            for batch in batches:
                started = time.perf_counter()
                losses[way].append(step(model, batch, context(batch["input_ids"].shape)))
                seconds[way].append(time.perf_counter() - started)
    medians = {way: round(statistics.median(s), 3) for way, s in seconds.items()}
    out = {"command": "PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/gate_attention.py "
                      "CHECKPOINT SUITE_DIR", "machine": machine(), "checkpoint": Path(checkpoint).name,
           "seconds_per_step_median": medians, "speedup": round(medians["SDPA"] / medians["eager for short rows"], 3),
           "largest_loss_difference": max(abs(a - b) for a, b in zip(*losses.values())),
           "tokens_per_batch": [int(b["attention_mask"].sum()) for b in batches]}
    Path(__file__).with_suffix(".json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
