"""Building a suite's assets once and finding them again: <out>/<name>-<key>/, keyed by a hash of the build
settings, uploaded to any store with the manifest written last (its presence marks a complete build).

    manifest_uri = cached_build(out_uri, "tinytasks", config.key(), functools.partial(_build_into, config=config))

The build runs in a child process: what it holds (a real model and a copy of it per adapter trained) goes back to
the machine when it ends. In the caller's process it stayed (6.7 GB after the chattasks build), and the gate
training that `make demo MODEL=smollm2` starts next was killed for memory on a 24 GB machine. A build's child
processes end when their parent does (a job driver stopped mid-build leaves no orphan), and report progress as
log lines where no terminal shows tqdm's bars (a Ray job's log).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml
from tqdm import tqdm

from meteora_moe.registry import API_VERSION, KIND
from meteora_moe.store import absolute_uri, cache_dir, open_store

log = logging.getLogger(__name__)
MANIFEST = "manifest.yaml"
BASELINES = {"lora-b": "the paper's LoRA-B: one LoRA trained on every task's items together",
             "merged": "the adapters' uniform average (peft add_weighted_adapter, cat)"}


def default_uri() -> str:
    """Where suites are built by default: the local cache ($METEORA_CACHE)."""
    return str(cache_dir() / "suites")


def cached_build(out_uri: str | None, name: str, key: str, build_into: Callable[[Path, str], None]) -> str:
    """The manifest URI of the build `name`-`key` under out_uri, made by `build_into(local_dir, final_uri)` in a child
    process if it is not there yet (the manifest holds absolute locations: a relative local out_uri is resolved).
    build_into must be picklable: a module-level function or a functools.partial of one."""
    out_uri = absolute_uri((out_uri or default_uri()).rstrip("/"))
    store, root = open_store(out_uri), f"{name}-{key}"
    manifest_uri = f"{out_uri}/{root}/{MANIFEST}"
    if store.exists(f"{root}/{MANIFEST}"):
        log.info("%s: found a complete build at %s", name, manifest_uri)
        return manifest_uri
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / root
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=start_child) as child:
            child.submit(build_into, local, f"{out_uri}/{root}").result()
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != MANIFEST)
        for path in tqdm(files, desc="uploading", disable=None):
            store.write_bytes(f"{root}/{path.relative_to(local).as_posix()}", path.read_bytes())
        store.write_bytes(f"{root}/{MANIFEST}", (local / MANIFEST).read_bytes())  # last: marks it complete
    return manifest_uri


def start_child() -> None:
    """In a build's child process: log progress lines (INFO), and exit when the parent is gone (checked every
    second: a parent killed by SIGKILL runs no cleanup that could stop its children)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def progress(items: Iterable, desc: str, total: int | None = None, every: int = 1) -> Iterator:
    """`items`, with tqdm's bar on a terminal, else a log line after every `every` of them (a job's log shows the
    build move)."""
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, total=total, leave=every == 1)
        return
    total, started = total or len(items), time.perf_counter()
    for done, item in enumerate(items, 1):
        yield item
        if done % every == 0 or done == total:
            log.info("%s: %d/%d done (%.0f s)", desc, done, total, time.perf_counter() - started)


def write_task_data(out: Path, data: dict[str, tuple[list[dict], list[dict]]]) -> None:
    """<out>/data/<task>/{train,eval}.jsonl: each task's (train, eval) samples, one JSON object a line."""
    for task, (train, evaluation) in data.items():
        for split, samples in (("train", train), ("eval", evaluation)):
            path = out / "data" / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(s) + "\n" for s in samples))


def write_manifest(out: Path, uri: str, base_model: dict, descriptions: dict[str, str], **shared) -> None:
    """<out>/manifest.yaml: an AdapterManifest over the build's adapters/<task>/ and data/<task>/ as they will lie
    under `uri`, one entry per task in `descriptions` (task -> description), and its baselines/<name>/ (LoRA-B and
    merged); `shared`: fields every adapter entry has."""
    adapters = [{"name": task, "uri": f"{uri}/adapters/{task}/", "description": description,
                 "data": {"train": f"{uri}/data/{task}/train.jsonl", "eval": f"{uri}/data/{task}/eval.jsonl"},
                 "metric": "exact_match", **shared} for task, description in descriptions.items()]
    baselines = [{"name": name, "uri": f"{uri}/baselines/{name}/", "description": description}
                 for name, description in BASELINES.items()]
    manifest = {"apiVersion": API_VERSION, "kind": KIND, "base_model": base_model, "adapters": adapters,
                "baselines": baselines}
    (out / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False))
