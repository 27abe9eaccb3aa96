"""tinytasks: deterministic, exactly scorable text tasks for the embedded benchmark.

Every sample is {"prompt": "<instruction>: <input>\\n", "response": "<answer>"}; a composite of n samples
puts the n prompts one after the other and answers them in order, one answer per line. Inputs are short strings of
lowercase letters (or digits), so a tiny character-level model can learn each task, and each task maps the
same kind of input to a different answer, so an adapter applied to another task's prompt answers wrongly.
DEFAULT_TASKS are 8 tasks; ALL_TASKS has 28, like the paper.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

LETTERS = "abcdefghijklmnop"  # a small alphabet keeps the tiny model's vocabulary and the tasks learnable


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    solve: Callable[[str], str]
    alphabet: str = LETTERS
    length: tuple[int, int] = (3, 6)  # input length range (inclusive)

    def sample(self, rng: random.Random) -> dict:
        text = "".join(rng.choice(self.alphabet) for _ in range(rng.randint(*self.length)))
        return {"prompt": prompt(self.instruction, text), "response": self.solve(text)}


def prompt(instruction: str, text: str) -> str:
    return f"{instruction}: {text}\n"


def _shift(text: str, k: int) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + k) % len(LETTERS)] for c in text)


def _rotate(text: str, k: int) -> str:
    k %= len(text)
    return text[k:] + text[:k]


_DIGITS = "0123456789"
ALL_TASKS: dict[str, Task] = {t.name: t for t in [
    Task("reverse", "reverse", lambda s: s[::-1]),
    Task("upper", "upper", str.upper),
    Task("shift1", "shift", lambda s: _shift(s, 1)),
    Task("double", "double", lambda s: "".join(c + c for c in s), length=(2, 4)),
    Task("sort", "sort", lambda s: "".join(sorted(s)), length=(3, 5)),
    Task("length", "length", lambda s: str(len(s)), length=(1, 9)),
    Task("digitsum", "digitsum", lambda s: str(sum(map(int, s))), alphabet=_DIGITS, length=(2, 4)),
    Task("swapends", "swapends", lambda s: s[-1] + s[1:-1] + s[0]),
    Task("rotate1", "rotate", lambda s: _rotate(s, 1)),
    Task("rotate2", "rotate2", lambda s: _rotate(s, 2)),
    Task("shift2", "shift2", lambda s: _shift(s, 2)),
    Task("shift3", "shift3", lambda s: _shift(s, 3)),
    Task("unshift1", "unshift", lambda s: _shift(s, -1)),
    Task("repeat", "repeat", lambda s: s + s, length=(2, 4)),
    Task("first", "first", lambda s: s[0]),
    Task("last", "last", lambda s: s[-1]),
    Task("firsttwo", "firsttwo", lambda s: s[:2]),
    Task("lasttwo", "lasttwo", lambda s: s[-2:]),
    Task("dropfirst", "dropfirst", lambda s: s[1:]),
    Task("droplast", "droplast", lambda s: s[:-1]),
    Task("evens", "evens", lambda s: s[::2]),
    Task("odds", "odds", lambda s: s[1::2], length=(4, 7)),
    Task("upperrev", "upperrev", lambda s: s[::-1].upper()),
    Task("sortdesc", "sortdesc", lambda s: "".join(sorted(s, reverse=True)), length=(3, 5)),
    Task("maxdigit", "maxdigit", lambda s: max(s), alphabet=_DIGITS, length=(3, 6)),
    Task("mindigit", "mindigit", lambda s: min(s), alphabet=_DIGITS, length=(3, 6)),
    Task("mirror", "mirror", lambda s: s + s[::-1], length=(2, 4)),
    Task("capital", "capital", lambda s: s[0].upper() + s[1:]),
]}
DEFAULT_TASKS = ["reverse", "upper", "shift1", "double", "sort", "length", "rotate1", "evens"]
assert len(ALL_TASKS) == 28 and all(set(t.instruction) <= set(string.ascii_lowercase + string.digits) for t in ALL_TASKS.values())


def make_samples(task: str, n: int, seed: int) -> list[dict]:
    """n distinct samples of `task` (distinct prompts), reproducible from the seed."""
    rng, seen, out = random.Random(f"{task}:{seed}"), set(), []
    for _ in range(100 * n):
        sample = ALL_TASKS[task].sample(rng)
        if sample["prompt"] not in seen:
            seen.add(sample["prompt"])
            out.append(sample)
            if len(out) == n:
                break
    return out


def split_samples(task: str, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and eval samples with no prompt in both (eval is filled first: small tasks get fewer train samples)."""
    samples = make_samples(task, n_train + n_eval, seed)
    return samples[n_eval:], samples[:n_eval]
