"""AsyncEngine: a GenerationEngine stepped by one background thread, with an async stream per request.

    async for event in engine.stream(prompt_ids, params): ...   # TokenEvents, the last one has a finish_reason
The thread sleeps while there is nothing to do and steps while any request runs, so a request that arrives
joins the running batch at the next step. A request whose consumer goes away (a client disconnect) is
cancelled. If a step raises, every request in flight gets that error and the engine carries on with new ones.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Callable

from ..errors import GenerationFailed
from .engine import GenerationEngine
from .requests import SamplingParams, TokenEvent

StepObserver = Callable[[list[TokenEvent]], None]  # called with each step's events (one per request in the batch)


class AsyncEngine:
    def __init__(self, engine: GenerationEngine, on_step: StepObserver | None = None):
        self.engine = engine
        self.on_step = on_step
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="meteora-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        request_id = f"r{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        try:
            self.engine.submit(request_id, prompt_ids, params)  # ValueError for a request it cannot run
            with self._wake:
                self._wake.notify()
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if self._streams.pop(request_id, None) is not None:
                self.engine.cancel(request_id)  # a no-op for a finished request

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.engine.has_work():
                    self._wake.wait()
                if self._closed:
                    return
            try:
                events = self.engine.step()
            except Exception as error:  # noqa: BLE001 - handed to every waiting request, the thread lives on
                for request_id in self.engine.abort_all():
                    self._deliver(request_id, GenerationFailed(f"generation failed: {error}"))
                continue
            if self.on_step is not None:
                self.on_step(events)
            for event in events:
                self._deliver(event.request_id, event)

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)
