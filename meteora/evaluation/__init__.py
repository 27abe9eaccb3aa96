"""Evaluating a fused model against its own adapters and the paper's baselines on a manifest's tasks.

    metrics.py   scoring one answer (the metrics a manifest may name)
    answers.py   batched greedy answers, per-task accuracy, composite-n problems and their oracle
    harness.py   every variant (base, own adapter, LoRA-B, merged, MeteoRA top-1/2) per task and on composites
    report.py    markdown tables and PNG plots (matplotlib, imported when plotting)
"""
from .answers import accuracy_per_task, composite_problems, composite_scores, generate_answers, task_accuracy
from .harness import Benchmark, evaluate, load_benchmark
from .metrics import METRICS
from .report import markdown_table, plot_accuracy, plot_routing

__all__ = ["Benchmark", "METRICS", "accuracy_per_task", "composite_problems", "composite_scores", "evaluate",
           "generate_answers", "load_benchmark", "markdown_table", "plot_accuracy", "plot_routing", "task_accuracy"]
