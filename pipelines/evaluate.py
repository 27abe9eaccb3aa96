"""Evaluate a benchmark: per-task accuracy and composite-n for base, own adapter, LoRA-B, merged and MeteoRA.

    python pipelines/evaluate.py [--manifest M] [--checkpoint C] [--tasks a,b] [--composite 3,5] [--out eval-output]

Without --manifest it evaluates the embedded tinytasks benchmark (building it first if needed). MeteoRA rows
appear when a checkpoint is given; the routing plot then shows learned gates.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from meteora.harness import evaluate, load_benchmark
from meteora.report import markdown_table
from meteora.store import local_dir, split_uri
from meteora.tinytasks import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=None)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--tasks", default=None, help="comma-separated subset of the manifest's adapters")
    parser.add_argument("--composite", default="3,5", help="composite sizes n (empty for none)")
    parser.add_argument("--composite-count", type=int, default=40, help="composite prompts per n")
    parser.add_argument("--composite-temperature", type=float, default=None, help="routing temperature for composites")
    parser.add_argument("--samples", type=int, default=None, help="eval samples per task (default: all)")
    parser.add_argument("--out", default="eval-output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = args.manifest or build()
    if "://" in manifest and not manifest.startswith("file://"):
        parent, name = split_uri(manifest)
        manifest = local_dir(parent) / name
    try:
        bench = load_benchmark(Path(manifest), args.tasks.split(",") if args.tasks else None, args.samples)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = [int(n) for n in args.composite.split(",") if n]
    results = evaluate(bench, args.checkpoint, sizes, args.composite_count, args.composite_temperature, args.out)
    print(markdown_table(results["per_task"], results["composite"]))
    print(f"written: {args.out}/results.json, results.md, accuracy.png, routing.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
