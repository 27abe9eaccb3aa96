"""Issue 17, the suite's bar (each own adapter >= 0.8 exact match): every own adapter of a built suite on all of
its task's eval samples (100 by default; the build reports the first 30), forced as MeteoRA's single expert as
the benchmark measures it.

    PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/own_adapters.py SUITE_DIR
"""
import copy
import json
import sys
from pathlib import Path

from meteora import MeteoraModel
from meteora.evaluation import load_benchmark, task_accuracy
from meteora.registry import load_manifest

sys.path.insert(0, str(Path(__file__).parents[3]))  # benchmarks/
from bench_mixture import machine  # noqa: E402


def main() -> None:
    suite = Path(sys.argv[1])
    bench = load_benchmark(load_manifest(str(suite / "manifest.yaml")))
    fused = MeteoraModel.from_adapters(copy.deepcopy(bench.base), bench.adapters, top_k=1, prompt_format=bench.fmt.name)
    own = {}
    for task, samples in bench.eval_sets.items():
        with fused.force_experts([task]):
            own[task] = round(task_accuracy(fused, bench.tokenizer, samples, bench.fmt, bench.metrics[task]), 3)
        print(task, own[task], flush=True)
    out = {"command": "PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/own_adapters.py SUITE_DIR",
           "machine": machine(), "suite": suite.name, "samples_per_task": len(samples), "own_adapter": own,
           "lowest": min(own.values())}
    Path(__file__).with_suffix(".json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
