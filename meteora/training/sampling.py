"""Which samples a data-parallel worker trains on at each step: deterministic in (seed, step, rank).

Every worker holds a disjoint shard of the task-labelled samples; the batch of step s on rank r is drawn from
that shard by a generator seeded with (seed, s, r). A run resumed from the checkpoint of step s therefore draws
exactly the batches an uninterrupted run would have drawn from step s + 1 on: no step repeated or skipped.
With `new_experts` (incremental training), a fixed share of every batch comes from the new experts' samples
(new_share), the rest from the old ones, so the new gate rows learn while the old tasks keep being seen.
With `composite_fraction`, about that share of the items are composites: the item's sample among 1..composite_max - 1
others drawn from the pool, those of its own task dropped (an item whose draws were all of its task stays single),
asked in one prompt (batches.gate_batch labels their tokens per segment).
"""
from __future__ import annotations

import random

Sample = tuple[dict, int]  # (sample, expert index)
Item = Sample | list[Sample]  # one sample, or a composite of several


def shuffled(samples: list[Sample], seed: int) -> list[Sample]:
    """`samples` in an order that depends on the seed only (the same on every rank)."""
    order = list(range(len(samples)))
    random.Random(f"shard:{seed}").shuffle(order)
    return [samples[i] for i in order]


def shard(samples: list[Sample], rank: int, world: int, seed: int) -> list[Sample]:
    """This rank's disjoint share of `samples`, after a shuffle every rank does the same way."""
    return shuffled(samples, seed)[rank::world]


def step_samples(pool: list[Sample], step: int, rank: int, size: int, seed: int, new_experts: set[int] = frozenset(),
                 new_fraction: float = 0.0, composite_fraction: float = 0.0, composite_max: int = 5) -> list[Item]:
    """The `size` items rank `rank` trains on at `step` (without replacement while the pool allows)."""
    rng = random.Random(f"step:{seed}:{step}:{rank}")
    new = [s for s in pool if s[1] in new_experts] if new_experts and new_fraction > 0 else []
    if new:
        n_new = max(1, round(size * new_fraction))
        old = [s for s in pool if s[1] not in new_experts] or new
        samples = _draw(rng, new, n_new) + _draw(rng, old, size - n_new)
    else:
        samples = _draw(rng, pool, size)
    return [composite_around(sample, pool, rng, composite_max) if rng.random() < composite_fraction else sample
            for sample in samples]


def new_share(new_fraction: float | None, new_experts: int, experts: int) -> float:
    """The share of every incremental batch drawn from the new experts' samples: `new_fraction`, or by default
    (None) the new experts' share of all experts, so every expert's data is drawn about equally often."""
    return new_experts / experts if new_fraction is None else new_fraction


def composite_around(sample: Sample, pool: list[Sample], rng: random.Random, composite_max: int) -> list[Sample]:
    """`sample` at a random place among 1..composite_max - 1 samples drawn from `pool`, less those of its task."""
    others = [rng.choice(pool) for _ in range(rng.randint(1, composite_max - 1))]
    items = [s for s in others if s[1] != sample[1]] + [sample]
    rng.shuffle(items)
    return items if len(items) > 1 else sample


def _draw(rng: random.Random, pool: list[Sample], size: int) -> list[Sample]:
    return rng.sample(pool, size) if size <= len(pool) else rng.choices(pool, k=size)
