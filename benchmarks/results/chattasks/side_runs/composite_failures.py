"""How composite sub-answers fail, on the 40 composites per n of `composites_40.py` (0-shot, the same checkpoint
and samples): every sub-answer of MeteoRA top-2 and of perfect routing sorted into
    right          scores under its task's metric
    missing        no line with its number (the reply ended early, or skipped the number)
    borrowed       the reference answer of another problem of the same composite
    other's input  another problem's input, unchanged
    own input      its own input, unchanged
    format slip    its reference but for case and final punctuation ("Key", "967.", "betty baker")
    cut short      a strict prefix of its reference (a date cut after its day, a number after a group)
    wrong          anything else (an answer of its task's form with the wrong content: a list's first number)
Counts are per composite (they sum to n). Tells how the adapters fail inside a composite (perfect routing) from
how routing adds to it (MeteoRA top-2)."""
import copy
import json
import sys
from collections import Counter

from meteora import MeteoraModel
from meteora.evaluation import METRICS, composite_problems, generate_answers, load_benchmark, teacher_routed_answers
from meteora.registry import load_manifest

KINDS = ("right", "missing", "borrowed", "other's input", "own input", "format slip", "cut short", "wrong")


def kind(answer: str, index: int, problem, metric: str) -> str:
    sample, others = problem.samples[index], [s for j, s in enumerate(problem.samples) if j != index]
    reference, answer = sample["response"].strip(), answer.strip()
    if METRICS[metric](answer, reference):
        return "right"
    if not answer:
        return "missing"
    if any(answer == s["response"].strip() for s in others):
        return "borrowed"
    if any(answer == s["prompt"].strip() for s in others):
        return "other's input"
    if answer == sample["prompt"].strip():
        return "own input"
    if _loose(answer) == _loose(reference):
        return "format slip"
    return "cut short" if reference.startswith(answer) else "wrong"


def _loose(text: str) -> str:
    return text.casefold().rstrip(".")


checkpoint, manifest, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
bench = load_benchmark(load_manifest(manifest), samples=30)
meteora = MeteoraModel.from_pretrained(checkpoint, base_model=copy.deepcopy(bench.base))
meteora.configure(top_k=2)
out = {"checkpoint": checkpoint, "composites_per_n": 40, "shots": 0, "kinds": KINDS, "meteora top-2": {}, "perfect routing": {},
       "answers": {}}
for n in (3, 5, 10):
    problems = composite_problems(bench.eval_sets, n, 40, bench.fmt)
    replies = generate_answers(meteora, bench.tokenizer, [p.joined.prompt for p in problems], bench.fmt, (), 16 * n)
    answers = {"meteora top-2": [bench.fmt.answers(r, n) for r in replies],
               "perfect routing": teacher_routed_answers(meteora, bench.tokenizer, problems, bench.fmt, (), 16 * n)}
    out["answers"][str(n)] = answers
    for row, rows in answers.items():
        counts = Counter(kind(a[i], i, p, bench.metrics[t]) for p, a in zip(problems, rows) for i, t in enumerate(p.tasks))
        out[row][str(n)] = {k: counts[k] / len(problems) for k in KINDS}  # per composite, summing to n
        print(n, row, out[row][str(n)], flush=True)
json.dump(out, open(out_path, "w"), indent=1)
