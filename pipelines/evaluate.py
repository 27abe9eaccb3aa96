"""Evaluate a benchmark: per-task accuracy and composite-n for base, own adapter, LoRA-B, merged and MeteoRA.

    python pipelines/evaluate.py [--manifest M] [--registry R] [--checkpoint C] [--tasks a,b] [--composite 3,5]
                                 [--out eval-output]

The manifest names what is evaluated (its adapters as tasks, its baselines); the adapters, their eval data and
the baselines are read from the registry they were collected into (collected first, a no-op when unchanged;
default registry: one per manifest in the cache). Without --manifest it evaluates the embedded tinytasks
benchmark (building it first if needed). MeteoRA rows appear when a checkpoint is given; the routing plot then
shows learned gates. The workflow's evaluate stage runs the same `evaluate_manifest` in a Ray task.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import logging.handlers
import queue
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # `python pipelines/evaluate.py` from anywhere

import ray  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from meteora_moe import ManifestError, StoreError  # noqa: E402
from meteora_moe.evaluation import CompositeSettings, evaluate, load_benchmark, markdown_table  # noqa: E402
from meteora_moe.registry import Manifest, Registry, load_manifest  # noqa: E402
from meteora_moe.store import cache_dir  # noqa: E402
from pipelines.collect_adapters import collected  # noqa: E402


DEFAULTS = CompositeSettings()


class EvaluateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True  # (the workflow's switch for this stage)
    tasks: list[str] | None = None  # a subset of the manifest's adapters; None: all
    composite: list[int] = list(DEFAULTS.sizes)  # composite-n sizes
    composite_count: int = Field(DEFAULTS.count, ge=1)  # composite prompts per n
    composite_shots: int = Field(DEFAULTS.shots, ge=0)  # worked composites before each question (chat format; the paper: 2)
    composite_temperature: float | None = Field(DEFAULTS.temperature, gt=0)  # also MeteoRA top-2 at this routing temperature
    samples: int | None = Field(None, ge=1)  # eval samples per task; None = all

    def composites(self) -> CompositeSettings:
        return CompositeSettings(tuple(self.composite), self.composite_count, self.composite_shots, self.composite_temperature)


def evaluate_manifest(manifest: Manifest, registry: str, checkpoint: str | None, settings: EvaluateSettings,
                      out_dir: str | Path) -> dict:
    """Every variant per task and on composites, of the manifest's adapters (or settings.tasks among them) and its
    baselines as `registry` holds them; results.json, results.md and the plots in `out_dir`."""
    unknown = sorted(set(settings.tasks or []) - set(manifest.names))
    if unknown:
        raise ValueError(f"{manifest.path}: unknown tasks {unknown}; the manifest has {manifest.names}")
    bench = load_benchmark(Registry(registry), settings.tasks or manifest.names, [b.name for b in manifest.baselines],
                           settings.samples)
    return evaluate(bench, checkpoint, settings.composites(), out_dir)


def manifest_registry(manifest: Manifest) -> str:
    """The registry a manifest evaluated on its own is collected into: one per manifest location, in the cache."""
    return str(cache_dir() / "registries" / f"evaluate-{hashlib.sha256(manifest.path.encode()).hexdigest()[:12]}")


@ray.remote(num_cpus=1)
def evaluate_task(manifest: Manifest, registry: str, checkpoint: str, settings: EvaluateSettings, out_dir: str):
    """evaluate_manifest in a Ray task (the workflow's evaluate stage), streamed: the harness's progress lines (str)
    as it scores each variant, then the tables (dict), so the driver shows progress whatever the workers' logs do."""
    with _progress_records() as records, ThreadPoolExecutor(1) as pool:
        running = pool.submit(evaluate_manifest, manifest, registry, checkpoint, settings, out_dir)
        while not (running.done() and records.empty()):
            with contextlib.suppress(queue.Empty):
                yield records.get(timeout=1).getMessage()
        results = running.result()
    yield {"per_task": results["per_task"], "composite": results["composite"]}


@contextlib.contextmanager
def _progress_records():
    """A queue of the harness's INFO records, while the block runs."""
    logger, records = logging.getLogger("meteora_moe.evaluation"), queue.Queue()
    handler, kept = logging.handlers.QueueHandler(records), (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(kept[0])
        logger.propagate = kept[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=None)
    parser.add_argument("--registry", default=None, help="where the manifest is collected (default: in the cache)")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--tasks", default=None, help="comma-separated subset of the manifest's adapters")
    parser.add_argument("--composite", default=None, help=f"composite sizes n (empty for none; default {DEFAULTS.sizes})")
    parser.add_argument("--composite-count", type=int, default=None, help=f"composite prompts per n (default {DEFAULTS.count})")
    parser.add_argument("--composite-shots", type=int, default=None, help=f"worked composites before each (chat format; default {DEFAULTS.shots})")
    parser.add_argument("--composite-temperature", type=float, default=None, help="also top-2 at this routing temperature")
    parser.add_argument("--samples", type=int, default=None, help="eval samples per task (default: all)")
    parser.add_argument("--out", default="eval-output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.manifest is None:
            from suites.tinytasks import build

            args.manifest = build()
        given = {"tasks": args.tasks.split(",") if args.tasks else None,
                 "composite": [int(n) for n in args.composite.split(",") if n] if args.composite is not None else None,
                 "composite_count": args.composite_count, "composite_shots": args.composite_shots,
                 "composite_temperature": args.composite_temperature, "samples": args.samples}
        settings = EvaluateSettings(**{key: value for key, value in given.items() if value is not None})
        manifest = load_manifest(args.manifest)
        registry = collected(manifest, args.registry or manifest_registry(manifest))
        results = evaluate_manifest(manifest, registry.uri, args.checkpoint, settings, args.out)
    except (ManifestError, StoreError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(results["per_task"], results["composite"]))
    print(f"written: {args.out}/results.json, results.md, accuracy.png, routing.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
