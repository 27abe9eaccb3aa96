"""What people look at after an evaluation: a markdown table and PNG plots (matplotlib, imported to plot, files only)."""
from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(per_task: dict[str, dict[str, float]], composite: dict[str, dict[str, dict]]) -> str:
    """per_task: variant -> task -> accuracy; composite: variant -> "n" -> {"summed", "per_position"}."""
    variants = list(per_task)
    tasks = list(next(iter(per_task.values())))
    lines = ["| task | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(f"{per_task[v][task]:.2f}" for v in variants) + " |")
    lines.append("| **mean** | " + " | ".join(f"{_mean(per_task[v]):.2f}" for v in variants) + " |")
    sizes = sorted({n for results in composite.values() for n in results}, key=int)
    if sizes:  # no composite evaluated: every variant's entry is empty
        lines += ["", "| composite: summed sub-answer accuracy (max n) and per position | " + " | ".join(f"n={n}" for n in sizes) + " |",
                  "|---" * (len(sizes) + 1) + "|"]
        for variant, results in composite.items():
            lines.append(f"| {variant} | " + " | ".join(_composite_cell(results[n]) if n in results else "-" for n in sizes) + " |")
    return "\n".join(lines) + "\n"


def _composite_cell(result: dict) -> str:
    return f"{result['summed']:.2f} ({' / '.join(f'{p:.2f}' for p in result['per_position'])})"


def plot_accuracy(per_task: dict[str, dict[str, float]], file: Path) -> None:
    plt = _pyplot()
    variants, tasks = list(per_task), list(next(iter(per_task.values())))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(tasks) + 2), 4))
    for i, variant in enumerate(variants):
        ax.bar([t + i * width for t in range(len(tasks))], [per_task[variant][task] for task in tasks], width, label=variant)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score on the eval split (the task's metric)")
    ax.set_title("accuracy per task")
    ax.legend(fontsize=8, ncols=min(len(variants), 4), loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_routing(shares: torch.Tensor, tokens: list[str], experts: list[str], title: str, file: Path) -> None:
    """shares [P, E]: each expert's routing weight per position (mean over layers), positions x experts."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(tokens) + 2), 0.4 * len(experts) + 1.8))
    image = ax.imshow(shares.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], fontsize=6, rotation=90)
    ax.set_yticks(range(len(experts)), experts, fontsize=8)
    ax.set_xlabel("input token at each position of the composite prompt and its generation")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)
