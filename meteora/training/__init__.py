"""Gate training: base model and adapters frozen, the gates learn CE_LM + lambda * CE_gate.

    config.py      GateTrainingConfig: the method's settings
    attention.py   the attention a training step runs (eager for short rows on CPU)
    loss.py        the MeteoRA loss and routing accuracy
    batches.py     task-labelled samples from a registry -> batches with per-token task labels; one step
    sampling.py    which items a worker trains on at each step (deterministic in seed, step, rank)
    fitting.py     fit_gates: every gate fitted from captured inputs in one forward pass (method "fit");
                   packed_batch (calibration rows without padding), input_groups (modules reading one input),
                   Guard (a registration's hold on the old experts' routing)
    collective.py  how data-parallel workers combine (both methods)
    trainer.py     GateTrainer: the one training loop (in one process, or one of N data-parallel workers)
    state.py       the resumable training state (gates + optimizer)
    warm_start.py  incremental registration: gate rows copied from an earlier checkpoint
"""
from .attention import training_attention
from .batches import gate_batch, gate_step, registry_samples, response_routing_accuracy
from .collective import Collective
from .config import METHODS, GateTrainingConfig
from .fitting import GUARD_MARGIN, UNLABELLED, Guard, fit_gates, fit_items, input_groups, packed_batch, solve_gates
from .loss import MeteoraLoss, lm_labels, meteora_loss, routing_accuracy, task_labels
from .sampling import Sample, composite_around, new_share, shard, shuffled, step_samples
from .state import load_train_state, save_train_state
from .trainer import GateTrainer, learning_rate
from .warm_start import WarmStart, init_gates_from

__all__ = ["GUARD_MARGIN", "METHODS", "UNLABELLED", "Collective", "GateTrainer", "GateTrainingConfig", "Guard",
           "MeteoraLoss", "Sample", "WarmStart",
           "composite_around", "fit_gates", "fit_items", "gate_batch", "gate_step", "init_gates_from", "input_groups",
           "learning_rate", "lm_labels", "load_train_state", "meteora_loss", "new_share", "packed_batch",
           "registry_samples", "response_routing_accuracy", "routing_accuracy", "save_train_state", "shard",
           "shuffled", "solve_gates", "step_samples", "task_labels", "training_attention"]
