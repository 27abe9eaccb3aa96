"""One Ray Train worker of pipelines/train_gates.py: data-parallel training of the MeteoRA gates.

Every worker builds the same MeteoraModel (base + experts frozen, the gates start equal: same seed, then a
broadcast from rank 0), trains on its own shard of the registry's task data, and averages the gate gradients
with the others after every backward: data parallelism like DDP's, over the gates only (one all-reduce of the
flattened gate gradients; the frozen base is never broadcast or reduced). Every `checkpoint_every` steps all
workers report metrics (a barrier) and rank 0 saves the gates + Adam state; a restarted worker group resumes
from the latest of those checkpoints with the exact batches the lost steps would have drawn.
At the end rank 0 writes the MeteoRA checkpoint, with the training summary in its config.
"""
from __future__ import annotations

import math
import tempfile
import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers import AutoTokenizer
from transformers.utils import logging as transformers_logging

from meteora import MeteoraModel, Registry
from meteora.gate_sampling import new_share, shard, shuffled, step_samples
from meteora.gate_training import GateTrainingConfig, gate_batch, gate_step, registry_samples, response_routing_accuracy
from meteora.store import local_dir
from meteora.train_state import load_train_state, save_train_state
from meteora.warm_start import init_gates_from, old_rows_mask

from .train_config import TrainGatesConfig


def train_loop_per_worker(job: dict) -> None:
    """job: {"config": TrainGatesConfig as a dict, "registry": URI, "experts": [names], "output": URI}."""
    config = TrainGatesConfig(**job["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    transformers_logging.disable_progress_bar()
    registry = Registry(job["registry"])
    model, tokenizer = _build_model(config, registry, job["experts"], ray.train.torch.get_device())
    new_experts = init_gates_from(model, config.init_from) if config.init_from else []
    _broadcast_gates(model, world)
    optimizer = torch.optim.Adam(model.gate_parameters(), lr=config.lr)
    step, state = _restore(model, optimizer)
    state["attempts"] = state.get("attempts", []) + [{"started_after_step": step, "world_size": world}]

    train = shard(registry_samples(registry, model.expert_names, "train"), rank, world, config.seed)
    evaluation = shuffled(registry_samples(registry, model.expert_names, "eval"), config.seed)[:config.eval_samples]
    evaluation = evaluation[rank::world]
    new_indices = {model.expert_names.index(name) for name in new_experts}
    new_fraction = new_share(config.new_fraction, len(new_indices), len(model.expert_names))
    mask = old_rows_mask(model, new_experts) if config.freeze_old else None
    step_config = GateTrainingConfig(gate_weight=config.gate_weight, exclude_prompt=config.exclude_prompt)
    window: list[dict] = []
    model.train()
    while step < config.steps:
        step += 1
        started = time.perf_counter()
        items = step_samples(train, step, rank, config.batch // world, config.seed, new_indices, new_fraction,
                             config.composite_fraction, config.composite_max)
        batch = gate_batch(tokenizer, items)
        optimizer.zero_grad()
        metrics = gate_step(model, batch, step_config)
        _average_gradients(model, world, mask)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        optimizer.step()
        window.append({**metrics, "tokens": int(batch["attention_mask"].sum()), "seconds": time.perf_counter() - started})
        if step % config.checkpoint_every == 0 or step == config.steps:
            record = _record(step, window, _routing_on(model, tokenizer, evaluation, world), config)
            state["history"] = state.get("history", []) + [record]
            state["train_seconds"] = state.get("train_seconds", 0.0) + sum(w["seconds"] for w in window)
            _report(model, optimizer, step, state, record, rank)
            window = []
    if rank == 0:
        _write_meteora_checkpoint(model, config, job, state, new_experts, registry)


def learning_rate(step: int, config: TrainGatesConfig) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to lr / 10 (a function of the step alone)."""
    warmup = max(1, config.steps // 20)
    if step <= warmup:
        return config.lr * step / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _build_model(config: TrainGatesConfig, registry: Registry, experts: list[str], device: torch.device):
    base_uri = registry.base_model["uri"]
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    model = MeteoraModel.from_adapters(base_uri, registry.adapter_dirs(experts), top_k=config.top_k,
                                       temperature=config.temperature, dtype=torch.bfloat16 if bf16 else None,
                                       seed=config.seed)
    tokenizer = AutoTokenizer.from_pretrained(local_dir(base_uri), trust_remote_code=False)
    return model.to(device), tokenizer


def _broadcast_gates(model: MeteoraModel, world: int) -> None:
    if world > 1:
        for gate in model.gate_parameters():
            dist.broadcast(gate.data, src=0)


def _average_gradients(model: MeteoraModel, world: int, mask: torch.Tensor | None) -> None:
    """All-reduce the mean of every gate's gradient over the workers (one flat buffer); zero frozen rows."""
    gates = model.gate_parameters()
    if world > 1:
        flat = torch.cat([gate.grad.flatten() for gate in gates])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for gate in gates:
            gate.grad.copy_(flat[offset:offset + gate.numel()].view_as(gate))
            offset += gate.numel()
    if mask is not None:
        for gate in gates:
            gate.grad.mul_(mask)


def _routing_on(model: MeteoraModel, tokenizer, samples: list, world: int) -> float:
    """Routing accuracy on the response tokens of every worker's eval shard, weighted by shard size."""
    model.eval()
    total = torch.tensor([0.0, float(len(samples))], device=model.device)  # NCCL reduces device tensors only
    if samples:
        total[0] = response_routing_accuracy(model, tokenizer, samples) * len(samples)
    model.train()
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] else float("nan")


def _record(step: int, window: list[dict], eval_routing: float, config: TrainGatesConfig) -> dict:
    seconds = sum(w["seconds"] for w in window)
    mean = {key: sum(w[key] for w in window) / len(window) for key in ("loss", "lm_loss", "gate_loss", "routing_accuracy")}
    return {"step": step, **mean, "eval_routing_accuracy": eval_routing,
            "tokens_per_s_per_worker": sum(w["tokens"] for w in window) / seconds,
            "samples_per_s": len(window) * config.batch / seconds, "lr": learning_rate(step, config)}


def _restore(model: MeteoraModel, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, {}
    with checkpoint.as_directory() as path:
        return load_train_state(path, model, optimizer)


def _report(model, optimizer, step: int, state: dict, record: dict, rank: int) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint and prints the progress line."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_train_state(tmp, model, optimizer, step, state)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(record, checkpoint=checkpoint)
    if rank == 0:
        print(f"step {step:>6}  loss {record['loss']:.4f}  lm {record['lm_loss']:.4f}  gate {record['gate_loss']:.4f}  "
              f"routing train {record['routing_accuracy']:.3f} eval {record['eval_routing_accuracy']:.3f}  "
              f"{record['tokens_per_s_per_worker']:.0f} tok/s/worker", flush=True)


def _write_meteora_checkpoint(model, config: TrainGatesConfig, job: dict, state: dict, new_experts: list[str],
                              registry: Registry) -> None:
    history = state.get("history", [])
    train_seconds = state.get("train_seconds", 0.0)
    model.training_summary = {
        "run_name": config.name, "registry": registry.uri, "steps": config.steps, "batch": config.batch,
        "num_workers": config.num_workers, "lr": config.lr, "gate_weight": config.gate_weight,
        "exclude_prompt": config.exclude_prompt, "seed": config.seed,
        "init_from": config.init_from, "new_experts": new_experts, "freeze_old": config.freeze_old,
        "new_fraction": new_share(config.new_fraction, len(new_experts), len(model.expert_names)),
        "train_seconds": round(train_seconds, 2),
        "samples_per_s": round(config.steps * config.batch / train_seconds, 2) if train_seconds else None,
        "attempts": state.get("attempts", []), "final": history[-1] if history else None, "history": history,
    }
    model.save_pretrained(job["output"])
