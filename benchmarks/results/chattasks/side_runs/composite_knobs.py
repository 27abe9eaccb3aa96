"""Inference-time routing knobs on composites, no retraining: MeteoRA at top-3 and at routing temperature 0.5
(sharper than the trained 1.0), against top-2 at T=1, on the same checkpoint, samples and 40 composites per n as
composites_40.py (0-shot)."""
import copy
import json
import sys

from meteora import MeteoraModel
from meteora.evaluation import composite_problems, composite_scores, load_benchmark
from meteora.registry import load_manifest

checkpoint, manifest, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
bench = load_benchmark(load_manifest(manifest), samples=30)
meteora = MeteoraModel.from_pretrained(checkpoint, base_model=copy.deepcopy(bench.base))
knobs = {"top-2, T=1": {"top_k": 2, "temperature": 1.0}, "top-3, T=1": {"top_k": 3, "temperature": 1.0},
         "top-2, T=0.5": {"top_k": 2, "temperature": 0.5}}
out = {"checkpoint": checkpoint, "composites_per_n": 40, "shots": 0, **{name: {} for name in knobs}}
for n in (3, 5, 10):
    problems = composite_problems(bench.eval_sets, n, 40, bench.fmt)
    for name, settings in knobs.items():
        with meteora.configured(**settings):
            out[name][str(n)] = composite_scores(meteora, bench.tokenizer, problems, bench.metrics, bench.fmt)
        print(n, name, out[name][str(n)]["summed"], flush=True)
json.dump(out, open(out_path, "w"), indent=1)
