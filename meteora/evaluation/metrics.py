"""Scoring one answer against its reference: the metrics a manifest may name."""
from __future__ import annotations

import math
from collections import Counter


def exact_match(answer: str, reference: str) -> float:
    return float(answer.strip() == reference.strip())


def contains(answer: str, reference: str) -> float:
    return float(reference.strip() in answer)


def rouge_l(answer: str, reference: str) -> float:
    """F1 of the longest common subsequence of words."""
    a, r = answer.split(), reference.split()
    if not a or not r:
        return float(a == r)
    lcs = [[0] * (len(r) + 1) for _ in range(len(a) + 1)]
    for i, word in enumerate(a):
        for j, ref in enumerate(r):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if word == ref else max(lcs[i][j + 1], lcs[i + 1][j])
    common = lcs[-1][-1]
    return 0.0 if common == 0 else 2 * common / (len(a) + len(r))


def bleu(answer: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU over words with add-one smoothing of the n-gram precisions and the brevity penalty."""
    a, r = answer.split(), reference.split()
    if not a:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        grams = Counter(tuple(a[i:i + n]) for i in range(len(a) - n + 1))
        ref_grams = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        matched = sum(min(count, ref_grams[g]) for g, count in grams.items())
        log_precision += math.log((matched + 1) / (sum(grams.values()) + 1)) / max_n
    brevity = min(0.0, 1 - len(r) / len(a))
    return math.exp(log_precision + brevity)


METRICS = {"exact_match": exact_match, "contains": contains, "rouge_l": rouge_l, "bleu": bleu}
