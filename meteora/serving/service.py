"""MeteoraService: a MeteoRA checkpoint ready to serve, the one interface an HTTP layer needs.

    service = MeteoraService.load(checkpoint, limits=ServingLimits(...))
    prompts = [service.encode_completion(text)]  or  [service.encode_chat(messages)]
    params = service.sampling(prompts, max_tokens=None, default_max_tokens=16, temperature=0, ...)  # checked
    service.admit(len(prompts))                                   # Busy when too many requests wait
    async for batch in service.streams(prompts, params): ...     # [(prompt index, TokenEvent)] as they arrive
Every check of a request is done here and by the engine it wraps (GenerationEngine.check), raising the
RequestErrors of meteora_moe.errors; a model loaded here runs on CUDA in bf16 when there is one, else on CPU in fp32.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from ..errors import Busy, CheckpointError
from ..model import ExpertInfo, MeteoraModel, load_tokenizer, read_checkpoint_config, runtime
from ..prompts import chat_ids
from .async_engine import AsyncEngine
from .engine import GenerationEngine
from .requests import SamplingParams, ServingLimits, TokenEvent


class MeteoraService:
    def __init__(self, model: MeteoraModel, tokenizer, limits: ServingLimits = ServingLimits(),
                 on_step: Callable[[list[TokenEvent]], None] | None = None):
        self.model, self.tokenizer, self.limits = model, tokenizer, limits
        self.engine = GenerationEngine(model, tokenizer, limits)
        self.context = self.engine.max_context
        self._async = AsyncEngine(self.engine, on_step)

    @classmethod
    def load(cls, checkpoint: str | Path, base_model: str | None = None, backend: str = "auto",
             limits: ServingLimits = ServingLimits(), threads: int = 1,
             on_step: Callable[[list[TokenEvent]], None] | None = None) -> "MeteoraService":
        """The checkpoint on its base model (the URI it records unless `base_model` is given) and tokenizer."""
        base = base_model or read_checkpoint_config(checkpoint).base.uri
        if not base:
            raise CheckpointError(f"checkpoint {checkpoint} records no base model URI: set base_model")
        device, dtype = runtime("auto", threads)
        model = MeteoraModel.from_pretrained(checkpoint, base_model=base, backend=backend, dtype=dtype).to(device)
        return cls(model, load_tokenizer(base), limits, on_step)

    # ---- what it serves -----------------------------------------------------------------------------------------
    @property
    def experts(self) -> list[ExpertInfo]:
        return self.model.experts

    @property
    def alive(self) -> bool:
        return self._async.alive

    def stats(self) -> dict[str, int]:
        return {"running": self.engine.running, "waiting": self.engine.waiting}

    def close(self) -> None:
        self._async.close()

    # ---- requests -----------------------------------------------------------------------------------------------
    def encode_completion(self, text: str) -> list[int]:
        """A raw prompt, as the experts' prompt format reads one (plain: <bos> text; chat: the text as it is)."""
        return self.model.prompt_format.completion_ids(self.tokenizer, text) if text else []

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Messages through the tokenizer's chat template (without one: their contents one per line)."""
        return chat_ids(self.tokenizer, messages) if any(m["content"] for m in messages) else []

    def sampling(self, prompts: list[list[int]], max_tokens: int | None, default_max_tokens: int, param: str = "prompt",
                 **options) -> SamplingParams:
        """SamplingParams for these prompts (max_tokens None: the default, as far as the context allows), every
        prompt checked by the engine; options are SamplingParams' other fields."""
        if max_tokens is None:
            room = self.context - max(map(len, prompts))
            max_tokens = max(1, min(default_max_tokens, room, self.limits.max_tokens_limit))
        params = SamplingParams(max_tokens=max_tokens, **options)
        for prompt in prompts:
            self.engine.check(prompt, params, param)
        return params

    def admit(self, count: int) -> None:
        """Back-pressure: Busy when more than max_waiting requests would wait for a place in the batch."""
        free = max(self.limits.max_batch_size - self.engine.running, 0)
        if self.engine.waiting + count - free > self.limits.max_waiting:
            raise Busy("too many requests are waiting on this replica; retry shortly", None, "server_busy")

    def streams(self, prompts: list[list[int]], params: SamplingParams) -> AsyncIterator[list[tuple[int, TokenEvent]]]:
        return _merged([self._async.stream(p, params) for p in prompts])


async def _merged(streams: list[AsyncIterator[TokenEvent]]) -> AsyncIterator[list[tuple[int, TokenEvent]]]:
    """Batches of (stream index, event) from several streams, each batch all that has arrived: a reader slower than
    the engine (a busy proxy) gets fewer, larger chunks instead of a growing backlog. Leaving early cancels all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[TokenEvent]) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        except Exception as error:  # noqa: BLE001 - re-raised in the consumer
            await queue.put((index, error))
        await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    running = len(tasks)
    try:
        while running:
            arrived = [await queue.get()]
            while not queue.empty():
                arrived.append(queue.get_nowait())
            for _, item in arrived:
                if isinstance(item, Exception):
                    raise item
            running -= sum(item is None for _, item in arrived)
            batch = [(index, item) for index, item in arrived if item is not None]
            if batch:
                yield batch
    finally:
        for task in tasks:
            task.cancel()
