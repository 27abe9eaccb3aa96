"""The MeteoRA model behind an OpenAI-compatible HTTP API, as a Ray Serve application (the project's only HTTP code).

    serve run configs/serve.yaml          import_path serve_app:app_builder, args = ServeSettings
    GET  /healthz   GET /v1/models   POST /v1/completions   POST /v1/chat/completions   (DESIGN.md, HTTP)

    HTTP request ─► create_app (FastAPI: auth, schemas, limits, OpenAI-shaped errors)
                    ─► MeteoraService (checkpoint + base model + tokenizer, prompt encoding)
                    ─► AsyncEngine (continuous batching in one thread per replica) ─► token events ─► JSON / SSE
Each replica batches the requests it holds: a request joins the running batch at the next decoding step and
requests for different tasks share forward passes, the gates routing every token. Extensions to OpenAI's
schema: "experts" (force these adapters, like model "<model>:<expert>") and "return_routing" (per generated
token, the experts' weights). Bad input is a 4xx in OpenAI's error shape, never a 5xx.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from meteora import AsyncEngine, GenerationEngine, MeteoraModel, SamplingParams, TokenEvent, load_tokenizer
from meteora.checkpoint import is_remote, read_checkpoint_config
from meteora.text_data import chat_prompt_ids, prompt_ids

log = logging.getLogger("meteora.serve")


class ServeSettings(BaseModel):
    """The application's arguments (`args:` in configs/serve.yaml)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str  # MeteoRA checkpoint: a directory or s3:// prefix
    base_model: str | None = None  # default: the base model URI the checkpoint records
    model_name: str = Field("meteora", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    backend: Literal["auto", "torch", "triton", "loop"] = "auto"  # auto: Triton on GPU, vectorized torch on CPU
    max_batch_size: int = Field(16, ge=1)  # requests decoded together per replica
    max_waiting: int = Field(64, ge=0)  # requests queued behind a full batch before 429
    max_prompt_tokens: int = Field(1024, ge=1)  # longer prompts: 413
    max_tokens_limit: int = Field(512, ge=1)  # largest max_tokens accepted
    api_key_env: str = "METEORA_API_KEY"  # when this environment variable is set, requests need its bearer token
    torch_threads: int = Field(1, ge=1)  # intra-op threads per replica (match the replica's CPUs)


# ---- request schemas --------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per prompt
    user: str | None = None
    experts: list[str] | None = Field(None, min_length=1)  # extension: force these experts
    return_routing: bool = False  # extension: per generated token, the experts' weights
    ignore_eos: bool = False  # extension (as in vLLM): generate max_tokens even past EOS


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ---- the model and its engine (no HTTP, no Ray) -----------------------------------------------------------------
class MeteoraService:
    def __init__(self, settings: ServeSettings, on_step=None):
        self.settings = settings
        torch.set_num_threads(settings.torch_threads)
        base = settings.base_model or read_checkpoint_config(settings.checkpoint)["base_model"].get("uri")
        if not base:
            raise ValueError(f"checkpoint {settings.checkpoint} records no base model URI: set base_model")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = MeteoraModel.from_pretrained(settings.checkpoint, base_model=base, backend=settings.backend, dtype=dtype)
        self.model.to(device)
        self.tokenizer = load_tokenizer(base)
        self.context = self.model.base_model.config.max_position_embeddings
        self.engine = AsyncEngine(GenerationEngine(self.model, self.tokenizer, settings.max_batch_size), on_step)
        self.api_key = os.environ.get(settings.api_key_env) or None
        self.created = int(time.time())

    def close(self) -> None:
        self.engine.close()

    def model_ids(self) -> list[str]:
        return [self.settings.model_name] + [f"{self.settings.model_name}:{e}" for e in self.model.expert_names]

    def forced_experts(self, model: str, experts: list[str] | None) -> tuple[str, ...]:
        name, _, expert = model.partition(":")
        if name != self.settings.model_name or (expert and expert not in self.model.expert_names):
            raise APIError(404, f"model {model!r} does not exist; models: {self.model_ids()}", "model", "model_not_found")
        unknown = [e for e in experts or [] if e not in self.model.expert_names]
        if unknown:
            raise APIError(404, f"unknown experts {unknown}; experts: {self.model.expert_names}", "experts", "expert_not_found")
        if expert and experts and experts != [expert]:
            raise APIError(400, f"model {model!r} forces expert {expert!r} but experts={experts}", "experts", "conflicting_experts")
        if experts and len(set(experts)) != len(experts):
            raise APIError(400, f"experts {experts} repeats a name", "experts", "duplicate_experts")
        return (expert,) if expert else tuple(experts or ())

    def check_prompt(self, ids: list[int], text_empty: bool, param: str) -> list[int]:
        if text_empty:
            raise APIError(400, "the prompt is empty", param, "empty_prompt")
        limit = min(self.settings.max_prompt_tokens, self.context - 1)
        if len(ids) > limit:
            raise APIError(413, f"the prompt has {len(ids)} tokens; the limit is {limit}", param, "prompt_too_long")
        return ids

    def sampling(self, body: GenerationRequest, max_tokens: int | None, default: int, prompts: list[list[int]],
                 experts: tuple[str, ...]) -> SamplingParams:
        room = self.context - max(map(len, prompts))
        if max_tokens is None:
            max_tokens = min(default, room, self.settings.max_tokens_limit)
        elif max_tokens > self.settings.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {self.settings.max_tokens_limit}",
                           "max_tokens", "max_tokens_too_large")
        elif max_tokens > room:
            raise APIError(400, f"the prompt and max_tokens={max_tokens} exceed the model's context window of "
                           f"{self.context} tokens", "max_tokens", "context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop takes up to 4 non-empty strings", "stop", "invalid_stop")
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                              stop=tuple(stop), experts=experts, ignore_eos=body.ignore_eos)

    def admit(self, count: int) -> None:
        """Back-pressure: 429 when more than max_waiting requests would wait for a place in the batch."""
        engine = self.engine.engine
        if engine.waiting + count - max(self.settings.max_batch_size - engine.running, 0) > self.settings.max_waiting:
            raise APIError(429, "too many requests are waiting on this replica; retry shortly", None, "server_busy",
                           "rate_limit_error")

    def streams(self, prompts: list[list[int]], params: SamplingParams) -> AsyncIterator[list[tuple[int, TokenEvent]]]:
        return _merged([self.engine.stream(p, params) for p in prompts])


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


# ---- the HTTP API ------------------------------------------------------------------------------------------------
def create_app(service: MeteoraService) -> FastAPI:
    app = FastAPI(title="MeteoRA", summary="One fused model, many LoRA experts, routed per token (OpenAI-compatible)")

    def authorized(request: Request) -> None:
        if service.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {service.api_key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer <key>)", None, "invalid_api_key",
                           "authentication_error")

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError):
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return APIError(400, "malformed JSON body", None, "json_invalid").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]  # e.g. ["prompt", "str"]: field, then union member
        return APIError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg')}", loc[0] if loc else None, first.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException):
        return APIError(error.status_code, str(error.detail), None, None).response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception):
        log.exception("internal error")
        return APIError(500, f"internal error: {type(error).__name__}", None, None, "server_error").response()

    @app.get("/healthz")
    async def healthz():
        if not service.engine.alive:
            raise APIError(503, "the generation engine stopped", None, "engine_stopped", "server_error")
        return {"status": "ok", "model": service.settings.model_name, "experts": service.model.expert_names,
                "running": service.engine.engine.running, "waiting": service.engine.engine.waiting}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        fused = {"id": service.settings.model_name, "object": "model", "created": service.created, "owned_by": "meteora",
                 "experts": service.model.expert_names}
        experts = [{"id": f"{service.settings.model_name}:{e['name']}", "object": "model", "created": service.created,
                    "owned_by": "meteora", "parent": service.settings.model_name, "description": e.get("description")}
                   for e in service.model.experts]
        return {"object": "list", "data": [fused] + experts}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest):
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts or len(texts) > service.settings.max_batch_size:
            raise APIError(400, f"prompt takes a string or 1-{service.settings.max_batch_size} strings", "prompt", "invalid_prompt")
        experts = service.forced_experts(body.model, body.experts)
        prompts = [service.check_prompt(prompt_ids(service.tokenizer, t), not t, "prompt") for t in texts]
        params = service.sampling(body, body.max_tokens, 16, prompts, experts)
        return await _respond(service, body, prompts, params, "text_completion")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest):
        experts = service.forced_experts(body.model, body.experts)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        empty = not any(m.content for m in body.messages)
        prompts = [service.check_prompt(chat_prompt_ids(service.tokenizer, messages), empty, "messages")]
        limit = body.max_completion_tokens or body.max_tokens
        params = service.sampling(body, limit, service.settings.max_tokens_limit, prompts, experts)
        return await _respond(service, body, prompts, params, "chat.completion")

    return app


async def _respond(service: MeteoraService, body: GenerationRequest, prompts: list[list[int]], params: SamplingParams,
                   kind: str):
    service.admit(len(prompts))
    header = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
              "created": int(time.time()), "model": body.model}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _sse_chunks(service, prompts, params, kind, header, body.return_routing, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    events: list[list[TokenEvent]] = [[] for _ in prompts]
    try:
        async for batch in service.streams(prompts, params):
            for index, event in batch:
                events[index].append(event)
    except RuntimeError as error:
        raise APIError(503, str(error), None, "generation_failed", "server_error") from None
    choices = [_choice(kind, i, evs, body.return_routing) for i, evs in enumerate(events)]
    return {**header, "object": kind, "choices": choices, "usage": _usage(prompts, events)}


def _choice(kind: str, index: int, events: list[TokenEvent], routing: bool) -> dict:
    text, finish = "".join(e.text for e in events), events[-1].finish_reason
    choice = ({"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
              if kind == "chat.completion" else {"index": index, "text": text, "finish_reason": finish, "logprobs": None})
    if routing:
        choice["routing"] = _routing(events)
    return choice


def _routing(events: list[TokenEvent]) -> list[dict]:
    return [{"token": e.token, "experts": e.routing} for e in events]


def _usage(prompts: list[list[int]], events: list[list[TokenEvent]]) -> dict:
    prompt_tokens, completion_tokens = sum(map(len, prompts)), sum(map(len, events))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


async def _sse_chunks(service, prompts, params, kind, header, routing: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, then [DONE]: a chunk per choice for the tokens that arrived since
    the last one (one token while the client keeps up), none while text is held back."""
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    counts = [0] * len(prompts)

    def chunk(choice: dict, **extra) -> str:
        return f"data: {json.dumps({**header, 'object': chunk_kind, 'choices': [choice], **extra})}\n\n"

    if kind == "chat.completion":
        for i in range(len(prompts)):
            yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    try:
        async for batch in service.streams(prompts, params):
            for index in sorted({i for i, _ in batch}):
                events = [event for i, event in batch if i == index]
                counts[index] += len(events)
                text, finish = "".join(e.text for e in events), events[-1].finish_reason
                if not (text or finish or routing):
                    continue
                delta = {"content": text} if text else {}
                choice = ({"index": index, "delta": delta, "finish_reason": finish} if kind == "chat.completion"
                          else {"index": index, "text": text, "finish_reason": finish, "logprobs": None})
                if routing:
                    choice["routing"] = _routing(events)
                yield chunk(choice)
    except RuntimeError as error:
        yield f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error', 'param': None, 'code': 'generation_failed'}})}\n\n"
    if include_usage:
        prompt_tokens = sum(map(len, prompts))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts), "total_tokens": prompt_tokens + sum(counts)}
        yield f"data: {json.dumps({**header, 'object': chunk_kind, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


# ---- Ray Serve -------------------------------------------------------------------------------------------------
class ServeMetrics:
    """Custom Prometheus metrics next to Serve's own ray_serve_*: tokens, per-expert routing, batch sizes."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.tokens = Counter("meteora_tokens_generated", description="Tokens generated.")
        self.routing = Counter("meteora_expert_routing", description="Generated tokens by their heaviest expert.",
                               tag_keys=("expert",))
        self.batch = Histogram("meteora_batch_size", description="Requests per decoding step.",
                               boundaries=[1, 2, 4, 8, 16, 32, 64])

    def observe(self, events: list[TokenEvent]) -> None:
        if not events:
            return
        self.batch.observe(len(events))
        self.tokens.inc(len(events))
        for event in events:
            if event.routing:
                self.routing.inc(tags={"expert": next(iter(event.routing))})


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32, health_check_period_s=10,
                  health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
@serve.ingress()
class MeteoraServer:
    def __init__(self, settings: dict):
        self.service = MeteoraService(ServeSettings.model_validate(settings), ServeMetrics().observe)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service)

    def check_health(self) -> None:
        if not self.service.engine.alive:
            raise RuntimeError("the generation engine thread stopped")

    def __del__(self):
        self.service.close()


def app_builder(args: dict) -> serve.Application:
    """`serve run` / `serve deploy` entry point: args are ServeSettings; relative local paths are taken from the
    directory the command runs in."""
    settings = ServeSettings.model_validate(args)
    settings.checkpoint = _absolute(settings.checkpoint)
    settings.base_model = settings.base_model and _absolute(settings.base_model)
    return MeteoraServer.bind(settings.model_dump())


def _absolute(uri: str) -> str:
    return uri if is_remote(uri) else str(Path(uri.removeprefix("file://")).resolve())
