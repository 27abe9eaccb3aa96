"""A client of the endpoint, for the demo and the benchmarks: one task's question asked back to back while the
application is redeployed, each answer checked for where its tokens were routed."""
from __future__ import annotations

import threading
import time

import httpx

from meteora_moe.registry import Manifest, read_samples
from meteora_moe.store import read_uri


def new_question(manifest: Manifest, task: str) -> tuple[str, dict]:
    """The first eval prompt of `task`, as a chat completion body."""
    spec = next(spec for spec in manifest.adapters if spec.name == task)
    prompt = read_samples(read_uri(spec.data["eval"]), f"{task}'s eval data")[0]["prompt"]
    return task, {"messages": [{"role": "user", "content": prompt.strip()}]}


def keep_asking(url: str, question: dict, expert: str, stop: threading.Event, outcomes: list) -> None:
    """A client sending chat completions back to back (during the redeploy): (seconds since it started, ok, whether
    the answer's tokens went mostly to `expert`) per request."""
    started = time.perf_counter()
    while not stop.is_set():
        try:
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": "meteora", "max_tokens": 8, "temperature": 0, "return_routing": True, **question})
            routed = r.status_code == 200 and _mostly(r.json()["choices"][0]["routing"], expert)
            outcomes.append((time.perf_counter() - started, r.status_code == 200, routed))
        except httpx.HTTPError:
            outcomes.append((time.perf_counter() - started, False, False))


def _mostly(routing: list[dict], expert: str) -> bool:
    """Whether `expert` is the heaviest expert of most generated tokens."""
    heaviest = [max(step["experts"], key=step["experts"].get) for step in routing if step["experts"]]
    return bool(heaviest) and heaviest.count(expert) > len(heaviest) / 2
