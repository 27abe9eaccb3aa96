"""Composite remedy: the same composites asked 0-shot (the adapters were trained without worked examples):
MeteoRA top-2 and perfect routing, first registration's checkpoint."""
import sys, json, copy
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[4]))  # the repository root
from meteora import MeteoraModel
from meteora.registry import load_manifest
from meteora.evaluation import load_benchmark, composite_problems, composite_scores, teacher_routed_scores
bench = load_benchmark(load_manifest("/tmp/bench-chattasks/first.yaml"), samples=30)
model = MeteoraModel.from_pretrained(sys.argv[1], base_model=copy.deepcopy(bench.base))
out = {"meteora top-2": {}, "perfect routing": {}}
for n in (3, 5, 10):
    problems = composite_problems(bench.eval_sets, n, 10, bench.fmt)
    args = (bench.tokenizer, problems, bench.metrics, bench.fmt)
    out["meteora top-2"][str(n)] = composite_scores(model, *args)
    out["perfect routing"][str(n)] = teacher_routed_scores(model, *args)
    print(n, out["meteora top-2"][str(n)]["summed"], out["perfect routing"][str(n)]["summed"], flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
