"""Composite remedy on the gate side: MeteoRA top-2 and perfect routing on the bench's composites (the same
prompts: 30 eval samples per task, 10 composites per n, 2-shot) for a checkpoint, e.g. gates trained with
composites of up to 10 problems (train.composite_max=10) against the bench's (up to 5)."""
import copy
import json
import sys

from meteora import MeteoraModel
from meteora.evaluation import composite_problems, composite_scores, composite_shots, load_benchmark, teacher_routed_scores
from meteora.registry import load_manifest

checkpoint, manifest, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
bench = load_benchmark(load_manifest(manifest), samples=30)
model = MeteoraModel.from_pretrained(checkpoint, base_model=copy.deepcopy(bench.base))
model.configure(top_k=2)
out = {"checkpoint": checkpoint, "meteora top-2": {}, "perfect routing": {}}
for n in (3, 5, 10):
    problems = composite_problems(bench.eval_sets, n, 10, bench.fmt)
    shots = composite_shots(bench.eval_sets, n, 2, bench.fmt)
    args = (bench.tokenizer, problems, bench.metrics, bench.fmt)
    out["meteora top-2"][str(n)] = composite_scores(model, *args, shots)
    out["perfect routing"][str(n)] = teacher_routed_scores(model, *args, shots)
    print(n, out["meteora top-2"][str(n)]["summed"], out["perfect routing"][str(n)]["summed"], flush=True)
json.dump(out, open(out_path, "w"), indent=1)
