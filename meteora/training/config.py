"""GateTrainingConfig: the one configuration of gate training (the method's settings, not where it runs).

pipelines/train_gates.py reads the same fields from configs/train_gates.yaml, beside the settings of the Ray job.
"""
from __future__ import annotations

from dataclasses import dataclass

METHODS = ("sgd", "fit", "fit+sgd")


@dataclass(frozen=True)
class GateTrainingConfig:
    method: str = "fit"  # fit: each gate fitted from captured inputs (fitting.py); sgd: the paper's loop; fit+sgd: both
    steps: int = 300  # optimizer steps
    batch: int = 32  # samples per step, over all workers
    lr: float = 5e-3  # Adam on the gates only; linear warm-up over 5% of the steps, then cosine decay to lr / 10
    gate_weight: float = 50.0  # lambda in CE_LM + lambda * CE_gate (the paper's value)
    exclude_prompt: bool = True  # CE_LM on response tokens only
    top_k: int = 2  # experts per token while training (and in the checkpoint)
    temperature: float = 1.0  # routing softmax temperature
    composite_fraction: float = 0.0  # share of items that are composites of 2..composite_max samples (0: the paper)
    composite_max: int = 5
    freeze_old: bool = False  # incremental: keep the gate rows carried over from the earlier checkpoint fixed
    new_fraction: float | None = None  # incremental: share of each batch from new experts; None: their share of all
    checkpoint_every: int = 50  # steps between checkpoints, metrics and progress lines
    eval_samples: int = 256  # eval-split samples for the routing accuracy at each checkpoint
    seed: int = 0
    fit_samples: int = 24  # fit: train samples per expert in the calibration items
    fit_tokens: int = 8192  # fit: labelled tokens per module and worker the gate is fitted on (0: all)
    fit_l2: float = 1e-2  # fit: L2 weight on the gate rows, each input feature in units of its RMS
    fit_iters: int = 25  # fit: L-BFGS iterations per module (or per group of modules reading one input)
    fit_guard: float = 3.0  # fit, registering (freeze_old): the Guard's weight (fitting.py; 0: off)
    fit_guard_l2: float = 1e-3  # fit, registering with the guard: fit_l2 of every fitted row
    fit_guard_iters: int = 50  # ... and fit_iters where old rows are held (modules new experts share with old ones)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        positive = {"steps": self.steps, "batch": self.batch, "top_k": self.top_k, "checkpoint_every": self.checkpoint_every,
                    "fit_samples": self.fit_samples, "fit_iters": self.fit_iters, "fit_guard_iters": self.fit_guard_iters}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in {"lr": self.lr, "temperature": self.temperature}.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        for name, value in {"gate_weight": self.gate_weight, "eval_samples": self.eval_samples, "fit_tokens": self.fit_tokens,
                            "fit_l2": self.fit_l2, "fit_guard": self.fit_guard,
                            "fit_guard_l2": self.fit_guard_l2}.items():
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        fractions = {"composite_fraction": self.composite_fraction, "new_fraction": self.new_fraction}
        for name, value in fractions.items():
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.composite_max < 2:
            raise ValueError(f"composite_max must be >= 2, got {self.composite_max!r}")
