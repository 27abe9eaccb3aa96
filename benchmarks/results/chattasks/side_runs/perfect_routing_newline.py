"""Perfect routing again after its fix (2026-12-05): in the chat format each answer's closing newline now goes to
the next answer's expert, as gate training labels it (PromptFormat.next_answer), not to the answer it ends. The
same checkpoint, samples and 40 composites per n as composites_40.py (0-shot); the first 10 of them are the
bench's 10 (the same seeded draws), so both rows can be compared with the runs before the fix."""
import copy
import json
import sys
import time

from meteora import MeteoraModel
from meteora.evaluation import composite_problems, composite_summary, load_benchmark, teacher_routed_answers
from meteora.registry import load_manifest

checkpoint, manifest, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
bench = load_benchmark(load_manifest(manifest), samples=30)
meteora = MeteoraModel.from_pretrained(checkpoint, base_model=copy.deepcopy(bench.base))
meteora.configure(top_k=2)
out = {"checkpoint": checkpoint, "shots": 0, "40 per n": {}, "first 10 per n (the bench's)": {}, "seconds": {}}
for n in (3, 5, 10):
    started = time.perf_counter()
    problems = composite_problems(bench.eval_sets, n, 40, bench.fmt)
    answers = teacher_routed_answers(meteora, bench.tokenizer, problems, bench.fmt, max_new_tokens=16 * n)
    out["40 per n"][str(n)] = composite_summary(problems, answers, bench.metrics)
    out["first 10 per n (the bench's)"][str(n)] = composite_summary(problems[:10], answers[:10], bench.metrics)
    out["seconds"][str(n)] = round(time.perf_counter() - started)
    print(n, out["40 per n"][str(n)]["summed"], out["first 10 per n (the bench's)"][str(n)]["summed"], flush=True)
json.dump(out, open(out_path, "w"), indent=1)
