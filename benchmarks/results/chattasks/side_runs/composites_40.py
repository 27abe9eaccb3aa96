"""The bench's composite rows that decide "MeteoRA above LoRA-B" on 40 composites per n instead of 10 (one
composite is then 0.025 of a summed score): LoRA-B, MeteoRA top-2 and perfect routing, 0-shot, the same 30 eval
samples per task as the bench, for a first-registration checkpoint."""
import copy
import json
import sys

from peft import PeftModel

from meteora import MeteoraModel
from meteora.evaluation import composite_problems, composite_scores, load_benchmark, teacher_routed_scores
from meteora.registry import load_manifest

checkpoint, manifest, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
bench = load_benchmark(load_manifest(manifest), samples=30)
meteora = MeteoraModel.from_pretrained(checkpoint, base_model=copy.deepcopy(bench.base))
meteora.configure(top_k=2)
lora_b = PeftModel.from_pretrained(copy.deepcopy(bench.base), bench.baselines["lora-b"]).eval()
out = {"checkpoint": checkpoint, "composites_per_n": 40, "shots": 0, "lora-b": {}, "meteora top-2": {}, "perfect routing": {}}
for n in (3, 5, 10):
    problems = composite_problems(bench.eval_sets, n, 40, bench.fmt)
    args = (bench.tokenizer, problems, bench.metrics, bench.fmt)
    out["lora-b"][str(n)] = composite_scores(lora_b, *args)
    out["meteora top-2"][str(n)] = composite_scores(meteora, *args)
    out["perfect routing"][str(n)] = teacher_routed_scores(meteora, *args)
    print(n, {k: out[k][str(n)]["summed"] for k in ("lora-b", "meteora top-2", "perfect routing")}, flush=True)
json.dump(out, open(out_path, "w"), indent=1)
