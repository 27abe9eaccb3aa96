"""One Ray Train worker of pipelines/train_gates.py: data-parallel training of the MeteoRA gates.

Every worker builds the same MeteoraModel (base + experts frozen, the gates start equal: same seed, then a
broadcast from rank 0) and runs meteora_moe.training.GateTrainer on its own share of the registry's task data:
  fit       each worker runs its share of the calibration items forward; at every module the gate's loss and
            gradient are summed over the workers (all-reduce), so all fit the same gate; rank 0 leaves a
            progress record at most every 5 s. In fit+sgd a checkpoint follows, so a restart does not fit again.
  sgd       the gate gradients averaged with the others after every backward (one all-reduce of the flattened
            gate gradients; the frozen base is never broadcast or reduced). At every record all workers report
            (a barrier) and rank 0 saves the gates + Adam state; a restarted worker group resumes from the latest
            of those checkpoints with the exact batches the lost steps would have drawn.
At the end rank 0 writes the MeteoRA checkpoint, with the training summary in its config.
"""
from __future__ import annotations

import json
import resource
import tempfile
import time

import ray.train
import ray.train.torch
import torch.distributed as dist
from transformers.utils import logging as transformers_logging

from meteora_moe.model import MeteoraModel, load_tokenizer, runtime
from meteora_moe.registry import Registry
from meteora_moe.store import open_store
from meteora_moe.training import Collective, GateTrainer, init_gates_from, registry_samples, shard, shuffled

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
                                                                      "world_size": collective.world,
                                                                      "started_at": round(time.time(), 1),
                                                                      "node": ray.util.get_node_ip_address()}]
    method, seed, rank, world = config.training.method, config.training.seed, collective.rank, collective.world
    samples = registry_samples(registry, model.expert_names, "train")
    evaluation = shuffled(registry_samples(registry, model.expert_names, "eval"), seed)[:config.training.eval_samples]
    run = open_store(job["run"])
    if method in ("fit", "fit+sgd") and not trainer.fitted:
        record = trainer.fit(samples, evaluation[rank::world], on_module=_fit_progress(rank, run))
        _leave_progress(record, rank, run)
        if method == "fit+sgd":
            _report(trainer, record, rank, run)
    if method in ("sgd", "fit+sgd"):
        trainer.run(shard(samples, rank, world, seed), evaluation[rank::world],
                    on_checkpoint=lambda record: _report(trainer, record, rank, run))
    if rank == 0:
        model.training_summary = {**trainer.summary(), "run_name": config.name, "registry": registry.uri,
                                  "num_workers": config.num_workers, "peak_rss_mb": _peak_rss_mb(),
                                  "warm_start": warm_start.summary() if warm_start else None}
        model.save_pretrained(job["output"])


def _peak_rss_mb() -> int:
    """This worker's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _build_model(config: TrainGatesConfig, registry: Registry, experts: list[str]):
    device = ray.train.torch.get_device()  # this worker's GPU, or the CPU
    _, dtype = runtime(config.precision, config.cpus_per_worker, use_gpu=device.type == "cuda")
    base_uri = registry.base_model["uri"]
    model = MeteoraModel.from_adapters(base_uri, registry.adapter_dirs(experts), top_k=config.training.top_k,
                                       temperature=config.training.temperature, dtype=dtype, seed=config.training.seed,
                                       prompt_format=registry.prompt_format(experts))
    return model.to(device), load_tokenizer(base_uri)


def progress_line(record: dict, steps: int) -> str:
    if record.get("stage") == "fit":
        if "done" in record:  # a module's fit
            return f"fit {record['done']:>4}/{record['modules']} modules  {record['module']}  accuracy {record['accuracy']:.3f}"
        fitted = f"mean fit accuracy {record['fit_accuracy']:.3f}, " if record["modules"] else "nothing to fit; "
        return (f"fit done: {record['modules']} modules in {record['seconds']:.0f} s on {record['tokens']} labelled tokens; "
                f"{fitted}routing on eval responses {record['eval_routing_accuracy']:.3f}")
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
    _leave_progress(record, rank, run)


def _fit_progress(rank: int, run, every_s: float = 5.0):
    """on_module for the fit: rank 0 leaves a module's record at most every `every_s` seconds (and the last)."""
    last = 0.0

    def leave(record: dict) -> None:
        nonlocal last
        if time.monotonic() - last >= every_s or record["done"] == record["modules"]:
            last = time.monotonic()
            _leave_progress(record, rank, run)

    return leave


def _leave_progress(record: dict, rank: int, run) -> None:
    if rank == 0:
        run.write_bytes(PROGRESS_FILE, json.dumps(record).encode())
