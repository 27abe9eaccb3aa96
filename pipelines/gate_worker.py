"""One Ray Train worker of pipelines/train_gates.py: data-parallel training of the MeteoRA gates.

Every worker builds the same MeteoraModel (base + experts frozen, the gates start equal: same seed, then a
broadcast from rank 0) and runs meteora.training.GateTrainer on its own shard of the registry's task data, the
gate gradients averaged with the others after every backward (one all-reduce of the flattened gate gradients;
the frozen base is never broadcast or reduced). At every record all workers report (a barrier) and rank 0
saves the gates + Adam state; a restarted worker group resumes from the latest of those checkpoints with the
exact batches the lost steps would have drawn. At the end rank 0 writes the MeteoRA checkpoint, with the
training summary in its config.
"""
from __future__ import annotations

import json
import tempfile

import ray.train
import ray.train.torch
import torch.distributed as dist
from transformers.utils import logging as transformers_logging

from meteora.model import MeteoraModel, load_tokenizer, runtime
from meteora.registry import Registry
from meteora.store import open_store
from meteora.training import Collective, GateTrainer, init_gates_from, registry_samples, shard, shuffled

from .train_config import TrainGatesConfig

PROGRESS_FILE = "progress.json"  # rank 0's latest record, in the run's storage: the driver prints it


def train_loop_per_worker(job: dict) -> None:
    """job: {"config": TrainGatesConfig.flat(), "registry": URI, "experts": [names], "output": URI, "run": URI}."""
    config = TrainGatesConfig(**job["config"])
    context = ray.train.get_context()
    collective = Collective(context.get_world_rank(), context.get_world_size(), dist.all_reduce)
    transformers_logging.disable_progress_bar()
    registry = Registry(job["registry"])
    model, tokenizer = _build_model(config, registry, job["experts"])
    warm_start = init_gates_from(model, config.init_from) if config.init_from else None
    if collective.world > 1:
        for gate in model.gate_parameters():
            dist.broadcast(gate.data, src=0)
    trainer = GateTrainer(model, tokenizer, config.training, warm_start, collective)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            trainer.restore(path)
    trainer.state["attempts"] = trainer.state.get("attempts", []) + [{"started_after_step": trainer.step,
                                                                      "world_size": collective.world}]
    seed, rank, world = config.training.seed, collective.rank, collective.world
    train = shard(registry_samples(registry, model.expert_names, "train"), rank, world, seed)
    evaluation = shuffled(registry_samples(registry, model.expert_names, "eval"), seed)[:config.training.eval_samples]
    run = open_store(job["run"])
    trainer.run(train, evaluation[rank::world], on_checkpoint=lambda record: _report(trainer, record, rank, run))
    if rank == 0:
        model.training_summary = {**trainer.summary(), "run_name": config.name, "registry": registry.uri,
                                  "num_workers": config.num_workers,
                                  "warm_start": warm_start.summary() if warm_start else None}
        model.save_pretrained(job["output"])


def _build_model(config: TrainGatesConfig, registry: Registry, experts: list[str]):
    device = ray.train.torch.get_device()  # this worker's GPU, or the CPU
    _, dtype = runtime(config.precision, config.cpus_per_worker, use_gpu=device.type == "cuda")
    base_uri = registry.base_model["uri"]
    model = MeteoraModel.from_adapters(base_uri, registry.adapter_dirs(experts), top_k=config.training.top_k,
                                       temperature=config.training.temperature, dtype=dtype, seed=config.training.seed,
                                       prompt_format=registry.prompt_format(experts))
    return model.to(device), load_tokenizer(base_uri)


def progress_line(record: dict, steps: int) -> str:
    return (f"step {record['step']:>6}/{steps}  loss {record['loss']:.4f}  lm {record['lm_loss']:.4f}  "
            f"gate {record['gate_loss']:.4f}  routing train {record['routing_accuracy']:.3f} "
            f"eval {record['eval_routing_accuracy']:.3f}  {record['tokens_per_s_per_worker']:.0f} tok/s/worker")


def _report(trainer: GateTrainer, record: dict, rank: int, run) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint and leaves the record for the driver."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            trainer.save(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(record, checkpoint=checkpoint)
    if rank == 0:
        run.write_bytes(PROGRESS_FILE, json.dumps(record).encode())
