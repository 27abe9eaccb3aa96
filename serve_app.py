"""The MeteoRA model behind an OpenAI-compatible HTTP API, as a Ray Serve application (the project's only HTTP code).

    serve run configs/serve.yaml          import_path serve_app:app_builder, args = ServeSettings
    GET  /healthz   GET /v1/models   POST /v1/completions   POST /v1/chat/completions   (README.md, "Serving")

    HTTP request ─► create_app (FastAPI: auth, schemas, OpenAI-shaped errors)
                    ─► meteora.serving.MeteoraService (checkpoint + base model + tokenizer, prompt encoding, every
                       check of a request, continuous batching in one thread per replica) ─► token events ─► JSON / SSE
Each replica batches the requests it holds: a request joins the running batch at the next decoding step and
requests for different tasks share forward passes, the gates routing every token. Extensions to OpenAI's
schema: "experts" (force these adapters, like model "<model>:<expert>") and "return_routing" (per generated
token, the experts' weights). Bad input is a 4xx in OpenAI's error shape, never a 5xx.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException

from meteora import RequestError
from meteora.errors import Busy, GenerationFailed, InvalidRequest, PromptTooLong, UnknownExpert
from meteora.model import check_backend, checkpoint_exists
from meteora.serving import MeteoraService, SamplingParams, ServingLimits, TokenEvent
from meteora.store import absolute_uri

log = logging.getLogger("meteora.serve")


class ServeSettings(BaseModel):
    """The application's arguments (`args:` in configs/serve.yaml)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str  # MeteoRA checkpoint: a directory or s3:// prefix
    base_model: str | None = None  # default: the base model URI the checkpoint records
    model_name: str = Field("meteora", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    backend: Annotated[str, AfterValidator(check_backend)] = "auto"  # auto: Triton on GPU, one native call per layer on CPU
    max_batch_size: int = Field(16, ge=1)  # requests decoded together per replica
    max_waiting: int = Field(16, ge=0)  # prompts queued behind a full batch before 429 (16 + 16: max_ongoing_requests)
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


# meteora's typed request errors -> HTTP status and OpenAI error type
STATUS = {InvalidRequest: (400, "invalid_request_error"), UnknownExpert: (404, "invalid_request_error"),
          PromptTooLong: (413, "invalid_request_error"), Busy: (429, "rate_limit_error")}


def api_error(error: RequestError) -> APIError:
    status, kind = next((STATUS[c] for c in type(error).__mro__ if c in STATUS), STATUS[InvalidRequest])
    return APIError(status, error.message, error.param, error.code, kind)


def service_settings(settings: ServeSettings) -> dict:
    """MeteoraService.load's arguments from the application's settings."""
    limits = ServingLimits(settings.max_batch_size, settings.max_waiting, settings.max_prompt_tokens, settings.max_tokens_limit)
    return {"checkpoint": settings.checkpoint, "base_model": settings.base_model, "backend": settings.backend,
            "limits": limits, "threads": settings.torch_threads}


def forced_experts(model: str, experts: list[str] | None, model_ids: list[str]) -> tuple[str, ...]:
    """The experts a request forces: "<model>:<expert>" (one of `model_ids`) or the "experts" extension (whose
    names the service checks)."""
    if model not in model_ids:
        raise APIError(404, f"model {model!r} does not exist; models: {model_ids}", "model", "model_not_found")
    expert = model.partition(":")[2]
    if expert and experts and experts != [expert]:
        raise APIError(400, f"model {model!r} forces expert {expert!r} but experts={experts}", "experts", "conflicting_experts")
    return (expert,) if expert else tuple(experts or ())


# ---- the HTTP API ------------------------------------------------------------------------------------------------
def create_app(service: MeteoraService, settings: ServeSettings) -> FastAPI:
    app = FastAPI(title="MeteoRA", summary="One fused model, many LoRA experts, routed per token (OpenAI-compatible)")
    api_key, created, name = os.environ.get(settings.api_key_env) or None, int(time.time()), settings.model_name
    model_ids = [name] + [f"{name}:{e.name}" for e in service.experts]

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer <key>)", None, "invalid_api_key",
                           "authentication_error")

    @app.exception_handler(APIError)
    async def http_api_error(_: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError):
        return api_error(error).response()

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
        if not service.alive:
            raise APIError(503, "the generation engine stopped", None, "engine_stopped", "server_error")
        return {"status": "ok", "model": name, "experts": [e.name for e in service.experts], **service.stats()}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        fused = {"id": name, "object": "model", "created": created, "owned_by": "meteora",
                 "experts": [e.name for e in service.experts]}
        experts = [{"id": f"{name}:{e.name}", "object": "model", "created": created, "owned_by": "meteora", "parent": name}
                   for e in service.experts]
        return {"object": "list", "data": [fused] + experts}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest):
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts or len(texts) > settings.max_batch_size:
            raise APIError(400, f"prompt takes a string or 1-{settings.max_batch_size} strings", "prompt", "invalid_prompt")
        experts = forced_experts(body.model, body.experts, model_ids)
        prompts = [service.encode_completion(text) for text in texts]
        params = service.sampling(prompts, body.max_tokens, 16, "prompt", **_options(body, experts))
        return await _respond(service, body, prompts, params, "text_completion")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest):
        experts = forced_experts(body.model, body.experts, model_ids)
        prompts = [service.encode_chat([{"role": m.role, "content": m.content} for m in body.messages])]
        max_tokens = body.max_completion_tokens or body.max_tokens
        try:
            params = service.sampling(prompts, max_tokens, settings.max_tokens_limit, "messages", **_options(body, experts))
        except RequestError as error:
            if body.max_completion_tokens and error.param == "max_tokens":
                error.param = "max_completion_tokens"  # name the field this request sent
            raise
        return await _respond(service, body, prompts, params, "chat.completion")

    return app


def _options(body: GenerationRequest, experts: tuple[str, ...]) -> dict:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    return {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "stop": tuple(stop),
            "experts": experts, "ignore_eos": body.ignore_eos}


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
    except GenerationFailed as error:
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
    except GenerationFailed as error:
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
        self.settings = ServeSettings.model_validate(settings)
        self.service = MeteoraService.load(**service_settings(self.settings), on_step=ServeMetrics().observe)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service, self.settings)

    def check_health(self) -> None:
        if not self.service.alive:
            raise RuntimeError("the generation engine thread stopped")

    def __del__(self):
        service = getattr(self, "service", None)  # absent when loading failed
        if service is not None:
            service.close()


def app_builder(args: dict) -> serve.Application:
    """`serve run` / `serve deploy` entry point: args are ServeSettings; relative local paths are taken from the
    directory the command runs in. A checkpoint that is not there fails here, once, before any replica starts."""
    settings = ServeSettings.model_validate(args)
    settings.checkpoint = absolute_uri(settings.checkpoint)
    settings.base_model = settings.base_model and absolute_uri(settings.base_model)
    if not checkpoint_exists(settings.checkpoint):  # RayServeException: Serve reports its message, and retries none
        raise RayServeException(f"no MeteoRA checkpoint at {settings.checkpoint} (args.checkpoint): train one first "
                                "(`make demo` writes demo-output/checkpoint) or point args.checkpoint at yours")
    return MeteoraServer.bind(settings.model_dump())
