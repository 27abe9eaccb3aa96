"""Build the embedded tinytasks benchmark (base model, one PEFT adapter per task, baselines, data, manifest).

    python pipelines/build_tinytasks.py [--out DIR_OR_S3_URI] [--tasks reverse,upper,...]

Cached by content: a second run with the same settings finds the finished build and prints its manifest.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # `python pipelines/build_tinytasks.py` from anywhere

from meteora_moe import StoreError  # noqa: E402
from meteora_moe.store import local_dir, split_uri  # noqa: E402
from suites.tinytasks import TinyTasksConfig, build  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="local directory or s3://bucket/prefix (default: the local cache)")
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: the 8 default tasks)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = TinyTasksConfig(tasks=tuple(args.tasks.split(","))) if args.tasks else TinyTasksConfig()
        manifest = build(args.out, config)
        report = json.loads((local_dir(split_uri(manifest)[0]) / "build_report.json").read_text())
    except (ValueError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    accuracy = report["accuracy"]
    print(f"manifest: {manifest}   (built in {report['build_seconds']} s)")
    print(f"{'task':<10}{'base':>6}{'own':>6}{'best other adapter':>21}{'lora-b':>8}{'merged':>8}")
    for task, base in accuracy["base"].items():
        others = max(row[task] for name, row in accuracy["adapters"].items() if name != task)
        print(f"{task:<10}{base:>6.2f}{accuracy['adapters'][task][task]:>6.2f}{others:>21.2f}"
              f"{accuracy['lora-b'][task]:>8.2f}{accuracy['merged'][task]:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
