"""Load on the OpenAI-compatible endpoint (serve_app on a local Ray Serve): throughput, latency, batching.

One run, one local Ray, one replica (1 CPU, 1 torch thread) serving a tinytasks MeteoRA checkpoint; every request
streams a completion of exactly `--max-tokens` tokens (ignore_eos) over HTTP:
  concurrency  1, 4, 16 closed-loop clients, prompts cycling over the 8 tasks       (continuous batching)
  one-at-a-time  concurrency 16 against max_batch_size=1                            (the ratio batching must win)
  torch backend  one-at-a-time and batched c16 again with backend=torch: what the native CPU call (auto) gains
  8 tasks / one task  concurrency 16, non-streamed, the 8-task mix vs every prompt of one task (twice each,
               medians): what routing different tasks in one batch costs
  1000         1,000 requests at concurrency 16: errors must be 0
  engine alone the batch-16 decoding without HTTP or Serve (GenerationEngine in this process), for scale
Per run: requests/s, generated tokens/s, time to first token and latency (p50 / p99).
Writes benchmarks/results/serve/{results.json, results.md, throughput.png}.

    python benchmarks/bench_serve.py [--checkpoint C] [--max-tokens 32] [--requests 96]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import ray
import torch
from ray import serve

ROOT = Path(__file__).parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import bench_mixture  # noqa: E402
import serve_app  # noqa: E402
from meteora_moe.registry import Registry  # noqa: E402
from pipelines.local_cluster import free_ports  # noqa: E402
from pipelines.ray_env import LOCAL_RAY  # noqa: E402
from pipelines.train_config import load_train_config  # noqa: E402
from pipelines.train_gates import embedded_registry, train  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "serve"


def checkpoint_for_bench(given: str | None) -> str:
    """The checkpoint to serve: the one given, else gates trained here with pipelines/train_gates (the loop, as
    when the results were measured)."""
    if given:
        return given
    storage = ROOT / "benchmarks" / "results" / ".ray_results"
    existing = storage / "serve-bench" / "meteora"
    if not (existing / "meteora_config.json").is_file():
        overrides = {"registry": embedded_registry(), "storage_path": str(storage), "name": "serve-bench", "method": "sgd",
                     "steps": 300, "num_workers": 2, "checkpoint_every": 100}
        train(load_train_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))
    return str(existing)


def task_prompts(registry: str) -> dict[str, list[str]]:
    """A few eval prompts per task, from the registry's data."""
    reg = Registry(registry)
    samples = {name: reg.data_file(name, "eval").read_text().splitlines()[:8] for name in reg.names}
    return {name: [json.loads(line)["prompt"] for line in lines] for name, lines in samples.items()}


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int, stream: bool) -> dict:
    body = {"model": "meteora", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "ignore_eos": True, **({"stream_options": {"include_usage": True}} if stream else {})}
    started = time.perf_counter()
    if not stream:
        response = await client.post("/v1/completions", json=body)
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}"}
        done = time.perf_counter()
        return {"latency": done - started, "ttft": None, "tokens": response.json()["usage"]["completion_tokens"]}
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"error": f"HTTP {response.status_code}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["code"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None:
                first = time.perf_counter()
    done = time.perf_counter()
    return {"latency": done - started, "ttft": (first or done) - started, "tokens": tokens}


async def load(url: str, prompts: list[str], concurrency: int, total: int, max_tokens: int, stream: bool = True) -> dict:
    """`concurrency` closed-loop clients share `total` requests; prompts are taken in turn."""
    queue = list(range(total))
    results = []

    async def client_loop(client: httpx.AsyncClient):
        while queue:
            i = queue.pop()
            try:
                results.append(await one_request(client, prompts[i % len(prompts)], max_tokens, stream))
            except httpx.HTTPError as error:
                results.append({"error": type(error).__name__})

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]
    latencies, ttfts = sorted(r["latency"] for r in ok), sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    return {"concurrency": concurrency, "requests": total, "errors": len(results) - len(ok),
            "requests_per_s": round(len(ok) / wall, 2), "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None, "latency_p50_ms": round(1000 * statistics.median(latencies), 1),
            "latency_p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
            "wall_s": round(wall, 2)}


def engine_alone(checkpoint: str, prompts: list[str], max_tokens: int, backend: str) -> dict:
    """The same work without HTTP: GenerationEngine in this process, 16 prompts at once, one torch thread."""
    from meteora_moe import MeteoraModel, load_tokenizer
    from meteora_moe.prompts import prompt_format
    from meteora_moe.serving import GenerationEngine, SamplingParams, ServingLimits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = MeteoraModel.from_pretrained(checkpoint, backend=backend)
    tokenizer = load_tokenizer(model.base_info.uri)
    engine, params = GenerationEngine(model, tokenizer, ServingLimits(max_batch_size=16)), SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    batch = [prompt_format("plain").prompt_ids(tokenizer, p) for p in prompts[:16]]
    seconds = []
    for _ in range(4):
        started = time.perf_counter()
        engine.generate(batch, params)
        seconds.append(time.perf_counter() - started)
    torch.set_num_threads(threads)
    return {"concurrency": 16, "requests": 16, "tokens_per_s": round(16 * max_tokens / statistics.median(seconds[1:]), 1)}


def deploy(checkpoint: str, max_batch_size: int, backend: str = "auto") -> None:
    settings = {"checkpoint": checkpoint, "max_batch_size": max_batch_size, "max_waiting": 1024, "torch_threads": 1,
                "backend": backend}
    serve.run(serve_app.MeteoraServer.options(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1},
                                              logging_config={"log_level": "WARNING"})
              .bind(settings), name="meteora", route_prefix="/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96, help="requests per measured run (the 1000-request run aside)")
    parser.add_argument("--long-run", type=int, default=1000)
    args = parser.parse_args()
    ray.init(**LOCAL_RAY)
    try:
        checkpoint = checkpoint_for_bench(args.checkpoint)
        prompts = task_prompts(embedded_registry())
        mixed = [p for group in zip(*prompts.values()) for p in group]  # tasks interleaved
        one_task = prompts[next(iter(prompts))]
        port = free_ports(1)[0]
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        url = f"http://127.0.0.1:{port}"
        runs = {}
        for backend in ("torch", "auto"):
            name = f"engine alone, batch 16, {backend}"
            runs[name] = engine_alone(checkpoint, mixed, args.max_tokens, backend)
            print(f"{name:>28}: {json.dumps(runs[name])}", flush=True)

        def measure(name: str, prompts: list[str], concurrency: int, total: int, stream: bool = True) -> None:
            asyncio.run(load(url, prompts, concurrency, min(concurrency, 4), args.max_tokens, stream))  # warm-up
            runs[name] = asyncio.run(load(url, prompts, concurrency, total, args.max_tokens, stream))
            print(f"{name:>28}: {json.dumps(runs[name])}", flush=True)

        deploy(checkpoint, max_batch_size=1, backend="torch")
        measure("one-at-a-time c16, torch", mixed, 16, args.requests // 2)
        deploy(checkpoint, max_batch_size=16, backend="torch")
        measure("batched c16, torch", mixed, 16, args.requests)
        deploy(checkpoint, max_batch_size=1)
        measure("one-at-a-time c16", mixed, 16, args.requests // 2)
        deploy(checkpoint, max_batch_size=16)
        for concurrency in (1, 4, 16):
            measure(f"batched c{concurrency}", mixed, concurrency, args.requests if concurrency > 1 else args.requests // 4)
        for repeat in (1, 2):  # whole responses: streamed chunks would count how much text each task's answers hold
            measure(f"8 tasks c16 #{repeat}", mixed, 16, args.requests, stream=False)
            measure(f"one task c16 #{repeat}", one_task, 16, args.requests, stream=False)
        runs["long run c16"] = asyncio.run(load(url, mixed, 16, args.long_run, args.max_tokens))
        print(f"{'long run c16':>28}: {json.dumps(runs['long run c16'])}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    report(runs, args)


def report(runs: dict, args) -> None:
    def median_tokens_per_s(prefix: str) -> float:
        return statistics.median(r["tokens_per_s"] for name, r in runs.items() if name.startswith(prefix))

    summary = {
        "batching_speedup_c16": round(runs["batched c16"]["tokens_per_s"] / runs["one-at-a-time c16"]["tokens_per_s"], 2),
        "batching_speedup_c16_torch_backend": round(runs["batched c16, torch"]["tokens_per_s"]
                                                    / runs["one-at-a-time c16, torch"]["tokens_per_s"], 2),
        "auto_vs_torch_backend_c16": round(runs["batched c16"]["tokens_per_s"] / runs["batched c16, torch"]["tokens_per_s"], 2),
        "eight_tasks_vs_one_task_tokens_per_s": round(median_tokens_per_s("8 tasks") / median_tokens_per_s("one task"), 3),
        "long_run_errors": runs["long run c16"]["errors"],
    }
    machine = {**bench_mixture.machine(), "ray": ray.__version__}
    command = "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({"command": command.strip(), "machine": machine, "max_tokens": args.max_tokens,
                                                  "summary": summary, "runs": runs}, indent=2))
    header = "| run | concurrency | requests | errors | req/s | tokens/s | TTFT p50 ms | latency p50 ms | p99 ms |\n|---|---|---|---|---|---|---|---|---|\n"
    rows = "".join(f"| {name} | {r['concurrency']} | {r['requests']} | {r.get('errors', '')} | {r.get('requests_per_s', '')} | "
                   f"{r['tokens_per_s']} | {r.get('ttft_p50_ms', '')} | {r.get('latency_p50_ms', '')} | {r.get('latency_p99_ms', '')} |\n"
                   for name, r in runs.items())
    (OUT / "results.md").write_text(f"`{command.strip()}` on {machine['cpu']}, {machine['platform']}\n\n{header}{rows}\n"
                                    f"Summary: {json.dumps(summary)}\n")
    plot(runs, OUT / "throughput.png")
    print(json.dumps(summary))


def plot(runs: dict, path: Path) -> None:
    """Tokens/s and p50 latency per run, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in runs if "latency_p50_ms" in runs[name]]  # the HTTP runs
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.barh(names, [runs[n]["tokens_per_s"] for n in names], color="tab:blue")
    left.set_xlabel("generated tokens/s")
    right.barh(names, [runs[n]["latency_p50_ms"] for n in names], color="tab:orange")
    right.set_xlabel("latency p50 (ms)")
    right.set_yticks([])
    for axis in (left, right):
        axis.invert_yaxis()
    fig.suptitle("serve_app on one CPU replica: continuous batching vs one at a time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
