"""GateTrainer: gate training by either method, run by every data-parallel worker (pipelines/gate_worker.py) and,
with the defaults, alone in one process.

    fit (methods fit, fit+sgd): every gate fitted from captured inputs in one forward pass (fitting.py); with a warm
                            start whose copied rows are frozen, only the fresh rows (registration)
    for step in 1..steps:   (methods sgd, fit+sgd)   items(seed, step, rank) -> batch -> CE_LM + lambda * CE_gate -> backward
                            -> gradients averaged over the workers -> Adam step (warm-up, cosine decay)
    every checkpoint_every: a record (losses, routing accuracy on the eval split, throughput), then on_checkpoint
Only the gates train. The batch of step s on rank r depends only on (seed, s, r), so a run restored from the
state of step s on as many workers continues exactly as if it had never stopped.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..model import MeteoraModel
from .attention import training_attention
from .batches import gate_batch, gate_step, response_routing_accuracy
from .collective import Collective
from .config import GateTrainingConfig
from .fitting import fit_gates, fit_items
from .sampling import Sample, new_share, step_samples
from .state import load_train_state, save_train_state
from .warm_start import WarmStart


def learning_rate(step: int, config: GateTrainingConfig) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to lr / 10 (a function of the step alone)."""
    warmup = max(1, config.steps // 20)
    if step <= warmup:
        return config.lr * step / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


class GateTrainer:
    def __init__(self, model: MeteoraModel, tokenizer, config: GateTrainingConfig, warm_start: WarmStart | None = None,
                 collective: Collective = Collective()):
        self.model, self.tokenizer, self.config, self.collective = model, tokenizer, config, collective
        self.optimizer = torch.optim.Adam(model.gate_parameters(), lr=config.lr)
        self.new_experts = set(warm_start.new_expert_ids(model)) if warm_start else set()
        self.new_fraction = new_share(config.new_fraction, len(self.new_experts), len(model.expert_names))
        self.masks = warm_start.trainable_rows(model) if warm_start and config.freeze_old else None
        self.fit_rows = warm_start.fresh_rows(model) if warm_start and config.freeze_old else None
        self.step = 0
        self.state: dict = {}  # history, train_seconds, attempts, fit: kept in the training checkpoints

    @property
    def fitted(self) -> bool:
        """Whether the gates hold the fit already (this attempt's, or a restored one's)."""
        return "fit" in self.state

    def fit(self, samples: list[Sample], evaluation: list[Sample],
            on_module: Callable[[dict], None] | None = None) -> dict:
        """Fit the gates from every expert's `samples` (all of them: fit_items picks the calibration items and this
        worker takes its share), then measure routing on this worker's `evaluation` shard. on_module(progress)
        after each module. Returns the record (also the first of the history)."""
        items = fit_items(samples, self.config)[self.collective.rank::self.collective.world]

        def progress(done: int, total: int, module: str, stats: dict) -> None:
            if on_module is not None:
                on_module({"stage": "fit", "module": module, "done": done, "modules": total, **stats})

        report = fit_gates(self.model, self.tokenizer, items, self.config, self.collective, self.fit_rows, progress,
                           new_experts=sorted(self.new_experts) if self.fit_rows else ())
        modules = report.pop("modules")
        accuracy = [m["accuracy"] for m in modules.values()]
        record = {"step": 0, "stage": "fit", **report, "modules": len(modules),
                  "fit_accuracy": sum(accuracy) / len(accuracy) if accuracy else None,
                  "eval_routing_accuracy": self._eval_routing(evaluation)}
        self.state.update(fit={**record, "per_module": modules}, history=self.state.get("history", []) + [record],
                          train_seconds=self.state.get("train_seconds", 0.0) + report["seconds"])
        return record

    def restore(self, path: str | Path) -> None:
        self.step, self.state = load_train_state(path, self.model, self.optimizer)

    def save(self, path: str | Path) -> None:
        save_train_state(path, self.model, self.optimizer, self.step, self.state)

    def run(self, train: list[Sample], evaluation: list[Sample], on_checkpoint: Callable[[dict], None] | None = None) -> dict:
        """Train from the current step to config.steps on this worker's `train` shard; `on_checkpoint(record)` after
        every record (all workers call it equally often). Returns the last record."""
        config, record, window = self.config, {}, []
        self.model.train()
        while self.step < config.steps:
            self.step += 1
            window.append(self._step(train))
            if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                record = self._record(window, self._eval_routing(evaluation))
                self.state["history"] = self.state.get("history", []) + [record]
                self.state["train_seconds"] = self.state.get("train_seconds", 0.0) + sum(w["seconds"] for w in window)
                window = []
                if on_checkpoint is not None:
                    on_checkpoint(record)
        self.model.eval()
        return record

    def _step(self, train: list[Sample]) -> dict:
        config, started = self.config, time.perf_counter()
        items = step_samples(train, self.step, self.collective.rank, config.batch // self.collective.world, config.seed,
                             self.new_experts, self.new_fraction, config.composite_fraction, config.composite_max)
        batch = gate_batch(self.tokenizer, items, self.model.prompt_format)
        self.optimizer.zero_grad()
        with training_attention(self.model.base_model, batch["input_ids"].shape):
            metrics = gate_step(self.model, batch, config)
        self._average_gradients()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, config)
        self.optimizer.step()
        return {**metrics, "tokens": int(batch["attention_mask"].sum()), "seconds": time.perf_counter() - started}

    def _average_gradients(self) -> None:
        """The mean of every gate's gradient over the workers (one flat all-reduce); frozen rows zeroed."""
        gates = self.model.gate_parameters()
        if self.collective.world > 1:
            flat = self.collective.mean_(torch.cat([gate.grad.flatten() for gate in gates]))
            offset = 0
            for gate in gates:
                gate.grad.copy_(flat[offset:offset + gate.numel()].view_as(gate))
                offset += gate.numel()
        for gate, mask in zip(gates, self.masks or []):
            gate.grad.mul_(mask)

    def _eval_routing(self, samples: list[Sample]) -> float:
        """Routing accuracy on the response tokens of every worker's eval shard, weighted by shard size."""
        self.model.eval()
        total = torch.tensor([0.0, float(len(samples))], device=self.model.device)  # NCCL reduces device tensors only
        if samples:
            total[0] = response_routing_accuracy(self.model, self.tokenizer, samples, self.model.prompt_format) * len(samples)
        self.model.train()
        self.collective.sum_(total)
        return (total[0] / total[1]).item() if total[1] else float("nan")

    def _record(self, window: list[dict], eval_routing: float) -> dict:
        seconds = sum(w["seconds"] for w in window)
        mean = {key: sum(w[key] for w in window) / len(window) for key in ("loss", "lm_loss", "gate_loss", "routing_accuracy")}
        return {"step": self.step, **mean, "eval_routing_accuracy": eval_routing,
                "tokens_per_s_per_worker": sum(w["tokens"] for w in window) / seconds,
                "samples_per_s": len(window) * self.config.batch / seconds, "lr": learning_rate(self.step, self.config)}

    def summary(self) -> dict:
        """What the checkpoint's training summary records of what ran: the fit, the loop, or both."""
        history, seconds, steps = self.state.get("history", []), self.state.get("train_seconds", 0.0), self.step
        method = "+".join([m for m, ran in (("fit", self.fitted), ("sgd", steps > 0)) if ran]) or "none"
        return {"method": method, "steps": steps, "batch": self.config.batch, "lr": self.config.lr,
                "gate_weight": self.config.gate_weight, "exclude_prompt": self.config.exclude_prompt,
                "seed": self.config.seed, "freeze_old": self.config.freeze_old, "new_fraction": self.new_fraction,
                "train_seconds": round(seconds, 2),
                "samples_per_s": round(steps * self.config.batch / seconds, 2) if seconds and steps else None,
                "fit": self.state.get("fit"),  # with every module's fit accuracy, loss and iterations
                "attempts": self.state.get("attempts", []), "final": history[-1] if history else None, "history": history}
