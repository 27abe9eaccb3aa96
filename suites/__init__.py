"""Benchmark suites: self-contained assets (base model, PEFT adapters, baselines, task data, manifest) that the
project builds and caches by content, outside the meteora library."""
