"""`make demo`: the meteora library end to end on a tiny model, in about a minute on a CPU.

  1. a tiny random Llama base, saved as a model directory
  2. four synthetic tasks (task e: count up by e+1 inside token band e) and one PEFT LoRA adapter trained
     on each, with mixed ranks and target sets
  3. the adapters fused into one MeteoraModel; its gates trained with the MeteoRA loss (adapters frozen)
  4. per-task next-token accuracy: base, the task's own adapter (forced), MeteoRA with learned top-2 routing
  5. save -> load round trip, and the routing of one sequence whose task changes in the middle, drawn as a
     heatmap (positions x experts) in demo-output/routing.png

    python examples/demo.py [--out demo-output] [--gate-steps 300]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import warnings
from pathlib import Path

import matplotlib
import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from meteora import MeteoraModel, lm_labels, meteora_loss, routing_accuracy, task_labels

N_TASKS, BAND, LENGTH = 4, 24, 16
ADAPTERS = [(4, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]), (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
            (16, ["gate_proj", "up_proj", "down_proj"]), (8, ["q_proj", "v_proj", "up_proj", "down_proj"])]
log = logging.getLogger("demo")
matplotlib.use("Agg")  # files only, no display


def task_batch(batch: int, seed: int, task: int | None = None):
    """Task e: tokens e*BAND + (start + i*(e+1)) % BAND: the next token follows from the task's rule."""
    g = torch.Generator().manual_seed(seed)
    tasks = torch.randint(0, N_TASKS, (batch,), generator=g) if task is None else torch.full((batch,), task)
    start = torch.randint(0, BAND, (batch, 1), generator=g)
    ids = tasks[:, None] * BAND + (start + torch.arange(LENGTH) * (tasks[:, None] + 1)) % BAND
    return ids, torch.ones_like(ids), tasks


def next_token_accuracy(model, task: int) -> float:
    ids, mask, _ = task_batch(64, seed=10_000 + task, task=task)
    with torch.no_grad():
        predicted = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
    return (predicted[:, 2:] == ids[:, 3:]).float().mean().item()  # after two tokens the rule is determined


def train_adapter(base, task: int, rank: int, targets: list[str], path: Path, steps: int = 150) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(steps):
        ids, mask, _ = task_batch(32, seed=step, task=task)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(path)


def train_gates(model: MeteoraModel, steps: int) -> list[float]:
    optimizer = torch.optim.Adam(model.gate_parameters(), lr=5e-3)
    accuracy = []
    for step in (bar := tqdm(range(steps), desc="gate training", disable=None)):
        ids, mask, tasks = task_batch(16, seed=50_000 + step)
        with model.capture_gate_logits() as gate_logits:
            out = model(input_ids=ids, attention_mask=mask)
        loss = meteora_loss(out.logits, lm_labels(ids, mask), gate_logits, task_labels(tasks, mask))
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
        accuracy.append(routing_accuracy(gate_logits, task_labels(tasks, mask)))
        bar.set_postfix(loss=f"{loss.total.item():.3f}", routing=f"{accuracy[-1]:.2f}")
    return accuracy


def plot_routing(shares: torch.Tensor, tokens: list[int], experts: list[str], switch_at: int, file: Path) -> None:
    """shares [P, E]: each expert's mean routing weight per position, as a heatmap."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(0.45 * len(tokens) + 2, 0.5 * len(experts) + 1.5))
    image = ax.imshow(shares.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.axvline(switch_at - 0.5, color="white", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(tokens)), [str(t) for t in tokens], fontsize=7)
    ax.set_yticks(range(len(experts)), experts)
    ax.set_xlabel("input token at each position (dashed line: the task changes)")
    ax.set_title("MeteoRA routing per token (mean gate weight over all adapted layers)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-output")
    parser.add_argument("--gate-steps", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    torch.manual_seed(0)

    config = LlamaConfig(vocab_size=N_TASKS * BAND, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(out / "base")
    adapters = {}
    for task, (rank, targets) in enumerate(tqdm(ADAPTERS, desc="training one PEFT adapter per task", disable=None)):
        adapters[f"count-by-{task + 1}"] = out / "adapters" / f"count-by-{task + 1}"
        train_adapter(base, task, rank, targets, adapters[f"count-by-{task + 1}"])

    model = MeteoraModel.from_adapters(out / "base", adapters, top_k=2)
    accuracy = train_gates(model, args.gate_steps)
    model.training_summary = {"steps": args.gate_steps, "routing_accuracy_first": accuracy[0],
                              "routing_accuracy_last": accuracy[-1]}
    model.save_pretrained(out / "checkpoint")
    reloaded = MeteoraModel.from_pretrained(out / "checkpoint")
    ids = task_batch(4, seed=7)[0]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits), "the checkpoint must reproduce the model"

    rows = []
    for task, name in enumerate(model.expert_names):
        with model.force_experts([name]):
            own = next_token_accuracy(model, task)
        rows.append({"task": name, "base": next_token_accuracy(base, task), "own_adapter": own,
                     "meteora_top2": next_token_accuracy(model, task)})
    log.info("\nnext-token accuracy per task (the tokens after the rule is determined)")
    log.info(f"{'task':<12}{'base':>8}{'own adapter':>14}{'MeteoRA top-2':>16}")
    for row in rows:
        log.info(f"{row['task']:<12}{row['base']:>8.2f}{row['own_adapter']:>14.2f}{row['meteora_top2']:>16.2f}")
    log.info(f"routing accuracy (gate top-1 = true task): {accuracy[0]:.2f} at the start -> {accuracy[-1]:.2f} after "
             f"{args.gate_steps} steps")

    switch = torch.cat([task_batch(1, seed=1, task=0)[0][:, :8], task_batch(1, seed=2, task=2)[0][:, :8]], dim=1)
    generated = model.generate(switch, max_new_tokens=4, do_sample=False, return_routing=True, pad_token_id=0)
    top = [experts[0][0] for experts in generated.routing.top_experts()]
    log.info("routing of a sequence that switches from task 1 to task 3 after 8 tokens (top expert per position):")
    log.info("  " + " ".join(name.removeprefix("count-by-") for name in top))
    positions = generated.sequences[0, :-1].tolist()  # the input token at each traced position
    plot_routing(generated.routing.expert_weights()[0], positions, model.expert_names, 8, out / "routing.png")
    log.info(f"routing heatmap: {out / 'routing.png'}")

    sizes = {f.name: f.stat().st_size for f in (out / "checkpoint").iterdir()}
    base_size = sum(f.stat().st_size for f in (out / "base").glob("*.safetensors"))
    log.info(f"checkpoint {sum(sizes.values()) / 1e3:.0f} kB vs base model {base_size / 1e3:.0f} kB (referenced, not copied)")
    (out / "demo_results.json").write_text(json.dumps({"per_task": rows, "routing_accuracy": accuracy,
                                                       "switch_routing": top, "checkpoint_bytes": sizes}, indent=2))
    log.info(f"results: {out / 'demo_results.json'}")


if __name__ == "__main__":
    main()
