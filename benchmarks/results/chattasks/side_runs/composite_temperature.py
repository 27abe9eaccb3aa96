"""MeteoRA top-2 on composites at the routing temperatures of the paper's reference code (T = 15 / 20 / 30 for
composite-3 / 5 / 10) and at T = 5, against T = 1 (`composites_40.json`): 40 composites per n, 0-shot, the same
samples and checkpoint as `composites_40.py`."""
import copy
import json
import sys

from meteora import MeteoraModel
from meteora.evaluation import composite_problems, composite_scores, load_benchmark
from meteora.registry import load_manifest

checkpoint, manifest, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
PAPER_T = {3: 15.0, 5: 20.0, 10: 30.0}
bench = load_benchmark(load_manifest(manifest), samples=30)
meteora = MeteoraModel.from_pretrained(checkpoint, base_model=copy.deepcopy(bench.base))
meteora.configure(top_k=2)
out = {"checkpoint": checkpoint, "composites_per_n": 40, "shots": 0, "meteora top-2 T=5": {}, "meteora top-2 paper T": {}}
for n in (3, 5, 10):
    problems = composite_problems(bench.eval_sets, n, 40, bench.fmt)
    args = (bench.tokenizer, problems, bench.metrics, bench.fmt)
    for row, temperature in (("meteora top-2 T=5", 5.0), ("meteora top-2 paper T", PAPER_T[n])):
        with meteora.configured(temperature=temperature):
            out[row][str(n)] = {"temperature": temperature, **composite_scores(meteora, *args)}
    print(n, {k: out[k][str(n)]["summed"] for k in ("meteora top-2 T=5", "meteora top-2 paper T")}, flush=True)
json.dump(out, open(out_path, "w"), indent=1)
