"""Which samples a data-parallel worker trains on at each step: deterministic in (seed, step, rank).

Every worker holds a disjoint shard of the task-labelled samples; the batch of step s on rank r is drawn from
that shard by a generator seeded with (seed, s, r). A run resumed from the checkpoint of step s therefore draws
exactly the batches an uninterrupted run would have drawn from step s + 1 on: no step repeated or skipped.
With `new_experts` (incremental training), a fixed share of every batch comes from the new experts' samples,
the rest from the old ones, so the new gate rows learn fast while the old tasks keep being seen.
"""
from __future__ import annotations

import random

Sample = tuple[dict, int]  # (sample, expert index)


def shuffled(samples: list[Sample], seed: int) -> list[Sample]:
    """`samples` in an order that depends on the seed only (the same on every rank)."""
    order = list(range(len(samples)))
    random.Random(f"shard:{seed}").shuffle(order)
    return [samples[i] for i in order]


def shard(samples: list[Sample], rank: int, world: int, seed: int) -> list[Sample]:
    """This rank's disjoint share of `samples`, after a shuffle every rank does the same way."""
    return shuffled(samples, seed)[rank::world]


def step_samples(pool: list[Sample], step: int, rank: int, size: int, seed: int,
                 new_experts: set[int] = frozenset(), new_fraction: float = 0.0) -> list[Sample]:
    """The `size` samples rank `rank` trains on at `step` (without replacement while the pool allows)."""
    rng = random.Random(f"step:{seed}:{step}:{rank}")
    new = [s for s in pool if s[1] in new_experts]
    if not new or new_fraction <= 0:
        return _draw(rng, pool, size)
    n_new = max(1, round(size * new_fraction))
    old = [s for s in pool if s[1] not in new_experts] or new
    return _draw(rng, new, n_new) + _draw(rng, old, size - n_new)


def _draw(rng: random.Random, pool: list[Sample], size: int) -> list[Sample]:
    return rng.sample(pool, size) if size <= len(pool) else rng.choices(pool, k=size)
