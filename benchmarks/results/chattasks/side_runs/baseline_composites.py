"""LoRA-B and merged on the first registration's composites: the same prompts the bench's evaluation used
(composite_problems is seeded; eval sets cut to the same 30 samples), 2-shot, 10 per n."""
import sys, json
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[4]))  # the repository root
import copy
from peft import PeftModel
from meteora.registry import load_manifest
from meteora.evaluation import load_benchmark, composite_problems, composite_shots, composite_scores
bench = load_benchmark(load_manifest("/tmp/bench-chattasks/first.yaml"), samples=30)
out = {}
for name, path in bench.baselines.items():
    model = PeftModel.from_pretrained(copy.deepcopy(bench.base), path).eval()
    out[name] = {}
    for n in (3, 5, 10):
        problems = composite_problems(bench.eval_sets, n, 10, bench.fmt)
        shots = composite_shots(bench.eval_sets, n, 2, bench.fmt)
        out[name][str(n)] = composite_scores(model, bench.tokenizer, problems, bench.metrics, bench.fmt, shots)
        print(name, n, out[name][str(n)]["summed"], flush=True)
json.dump(out, open("/tmp/real/baseline_composites.json", "w"), indent=1)
