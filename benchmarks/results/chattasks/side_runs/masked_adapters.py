"""The suite's first 10 adapters trained again as `context_masked_adapter.py` trains its "masked" variant (LoRA in
composite items only on the own problem's and own answer's tokens), in 2 processes of 1 thread, saved as PEFT
adapters under OUT/<task>/.

    cd benchmarks/results/chattasks/side_runs && python masked_adapters.py MANIFEST OUT ["other problems"]

With "other problems", the LoRA is off only on the other problems' text in the user message.
"""
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from context_masked_adapter import train
from meteora.model import load_base_model, load_tokenizer
from meteora.registry import load_manifest
from suites.chattasks import RECIPES, ChatTasksConfig


def train_some(manifest: str, out: str, tasks: list[str], masked: bool | str) -> dict:
    torch.set_num_threads(1)
    base_uri = load_manifest(manifest).base_uri
    base, tokenizer = load_base_model(base_uri).eval(), load_tokenizer(base_uri)
    seconds = {}
    for task in tasks:
        started = time.perf_counter()
        train(base, tokenizer, ChatTasksConfig(), task, masked).save_pretrained(f"{out}/{task}")
        seconds[task] = round(time.perf_counter() - started, 1)
        print(task, seconds[task], flush=True)
    return seconds


if __name__ == "__main__":
    manifest, out = sys.argv[1], sys.argv[2]
    masked = sys.argv[3] if len(sys.argv) > 3 else True  # "other problems": context_masked_adapter.encode
    tasks = [r.task for r in RECIPES[:10]]
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        parts = [pool.submit(train_some, manifest, out, tasks[k::2], masked) for k in range(2)]
        seconds = {task: s for part in parts for task, s in part.result().items()}
    json.dump({"command": "cd benchmarks/results/chattasks/side_runs && python " + " ".join(sys.argv), "train_seconds": seconds},
              open(f"{out}/masked_adapters.json", "w"), indent=1)
