"""What a chattasks build is made of: each adapter's recipe, the build's settings, and `make demo`'s subset. The
settings (with BUILD_VERSION and the package's version) are the build's cache key."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from meteora_moe.model import bf16_is_fast

from . import lora
from .lora import MLP, QKVO, QV, QVO
from .tasks import TASKS

BUILD_VERSION = 3  # bump when the recipe or the manifest changes, so cached builds are not reused (3: baselines)


@dataclass(frozen=True)
class Recipe:
    task: str
    rank: int
    targets: tuple[str, ...]
    rslora: bool = False
    steps: int = 20


# The first 10 are the first registration; the last 2 the increment, on target modules no earlier adapter has.
RECIPES = (
    Recipe("iso_date", 4, QV),
    Recipe("larger", 8, QKVO),
    Recipe("list_max", 16, QV, rslora=True, steps=25),
    Recipe("join_commas", 4, QVO),
    Recipe("fix_sentence", 8, QV),
    Recipe("dedupe_words", 16, QKVO, steps=25),
    Recipe("email_name", 8, QVO),
    Recipe("word_after", 8, QV, steps=25),
    Recipe("int_commas", 16, QV),
    Recipe("kv_json", 8, QKVO),
    Recipe("last_first", 8, ("q_proj", "v_proj") + MLP),
    Recipe("snake_label", 4, MLP),
)


@dataclass(frozen=True)
class ChatTasksConfig:
    recipes: tuple[Recipe, ...] = RECIPES
    lr: float = 5e-3
    batch: int = 16
    composite_share: float = 0.5  # of each adapter's items: composites of 2..composite_max problems
    composite_max: int = 4
    shots: int = 0  # worked composites before each composite item (the paper asked composites 2-shot)
    lora_b_rank: int = 16
    lora_b_steps: int = 60
    bf16: bool = field(default_factory=bf16_is_fast)  # under bf16 autocast (fp32 master weights) where it is faster
    pass_cost: int = lora.PASS_COST  # how a batch is cut into training passes (lora.passes)
    n_train: int = 400
    n_eval: int = 100
    report_samples: int = 30  # eval samples per task measured at build time (the benchmark measures all)
    seed: int = 0

    def __post_init__(self):
        tasks = [r.task for r in self.recipes]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or len(set(tasks)) != len(tasks) or len(tasks) < 2:
            raise ValueError(f"recipes must name 2+ distinct tasks of {sorted(TASKS)}; got {tasks}")
        if self.composite_max < 2:
            raise ValueError(f"composite_max must be >= 2, got {self.composite_max!r}")
        if not 0 <= self.composite_share <= 1:
            raise ValueError(f"composite_share must be in [0, 1], got {self.composite_share!r}")
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0, got {self.shots!r}")

    def key(self, package_version: str) -> str:
        text = json.dumps([BUILD_VERSION, asdict(self), package_version], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def tasks(self) -> list[str]:
        return [r.task for r in self.recipes]


# `make demo`'s suite: 4 tasks (ranks 4-16 on different attention targets), then 2 on MLP projections (the increment),
# LoRA-B at the steps per task of the full suite's. About 9 minutes to build on 2 cores.
DEMO = ChatTasksConfig(recipes=tuple(r for r in RECIPES if r.task in ("iso_date", "larger", "email_name", "dedupe_words",
                                                                      "last_first", "snake_label")), lora_b_steps=30)
