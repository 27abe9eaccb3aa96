"""Gate training: base model and adapters frozen, the gates learn CE_LM + lambda * CE_gate.

    config.py      GateTrainingConfig: the method's settings
    attention.py   the attention a training step runs (eager for short rows on CPU)
    loss.py        the MeteoRA loss and routing accuracy
    batches.py     task-labelled samples from a registry -> batches with per-token task labels; one step
    sampling.py    which items a worker trains on at each step (deterministic in seed, step, rank)
    trainer.py     GateTrainer: the one training loop (in one process, or one of N data-parallel workers)
    state.py       the resumable training state (gates + optimizer)
    warm_start.py  incremental registration: gate rows copied from an earlier checkpoint
"""
from .attention import training_attention
from .batches import gate_batch, gate_step, registry_samples, response_routing_accuracy
from .config import GateTrainingConfig
from .loss import MeteoraLoss, lm_labels, meteora_loss, routing_accuracy, task_labels
from .sampling import Sample, new_share, shard, shuffled, step_samples
from .state import load_train_state, save_train_state
from .trainer import Collective, GateTrainer, learning_rate
from .warm_start import WarmStart, init_gates_from

__all__ = ["Collective", "GateTrainer", "GateTrainingConfig", "MeteoraLoss", "Sample", "WarmStart", "gate_batch",
           "gate_step", "init_gates_from", "learning_rate", "lm_labels", "load_train_state", "meteora_loss", "new_share",
           "registry_samples", "response_routing_accuracy", "routing_accuracy", "save_train_state", "shard", "shuffled",
           "step_samples", "task_labels", "training_attention"]
