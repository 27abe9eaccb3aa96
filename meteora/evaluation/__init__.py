"""Evaluating a fused model against its own adapters and the paper's baselines on a manifest's tasks.

    metrics.py   scoring one answer (the metrics a manifest may name)
    answers.py   batched greedy answers, per-task accuracy, composite-n problems and their oracle
    teacher.py   perfect routing: composites generated with every problem's tokens sent to its expert
    harness.py   every variant (base, own adapter, LoRA-B, merged, MeteoRA top-1/2, perfect routing) per task and
                 on composites
    report.py    markdown tables and PNG plots (matplotlib, imported when plotting)
"""
from .answers import (CompositeProblem, accuracy_per_task, answer_budget, composite_oracle_scores, composite_problems,
                      composite_scores, composite_shots, composite_summary, generate_answers, task_accuracy)
from .harness import Benchmark, CompositeSettings, evaluate, load_benchmark
from .metrics import METRICS
from .report import markdown_table, plot_accuracy, plot_routing

from .teacher import teacher_routed_answers, teacher_routed_scores, teacher_routed_tokens

__all__ = ["Benchmark", "CompositeProblem", "CompositeSettings", "METRICS", "accuracy_per_task", "answer_budget",
           "composite_oracle_scores", "composite_problems", "composite_scores", "composite_shots", "composite_summary",
           "evaluate", "generate_answers", "load_benchmark", "markdown_table", "plot_accuracy", "plot_routing",
           "task_accuracy", "teacher_routed_answers", "teacher_routed_scores", "teacher_routed_tokens"]
