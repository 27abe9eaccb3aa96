"""The HTTP API: auth, /healthz, /v1/models, /v1/completions and /v1/chat/completions over a MeteoraService."""
from __future__ import annotations

import os
import secrets
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from meteora_moe import RequestError
from meteora_moe.errors import GenerationFailed
from meteora_moe.serving import MeteoraService, SamplingParams, TokenEvent

from .errors import APIError, add_error_handlers
from .responses import response_choice, usage
from .schemas import ChatRequest, CompletionRequest, GenerationRequest
from .settings import ServeSettings
from .sse import sse_chunks


def forced_experts(model: str, experts: list[str] | None, model_ids: list[str]) -> tuple[str, ...]:
    """The experts a request forces: "<model>:<expert>" (one of `model_ids`) or the "experts" extension (whose
    names the service checks)."""
    if model not in model_ids:
        raise APIError(404, f"model {model!r} does not exist; models: {model_ids}", "model", "model_not_found")
    expert = model.partition(":")[2]
    if expert and experts and experts != [expert]:
        raise APIError(400, f"model {model!r} forces expert {expert!r} but experts={experts}", "experts", "conflicting_experts")
    return (expert,) if expert else tuple(experts or ())


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

    add_error_handlers(app)

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
        chunks = sse_chunks(service, prompts, params, kind, header, body.return_routing, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    events: list[list[TokenEvent]] = [[] for _ in prompts]
    try:
        async for batch in service.streams(prompts, params):
            for index, event in batch:
                events[index].append(event)
    except GenerationFailed as error:
        raise APIError(503, str(error), None, "generation_failed", "server_error") from None
    choices = [response_choice(kind, i, evs, body.return_routing) for i, evs in enumerate(events)]
    return {**header, "object": kind, "choices": choices, "usage": usage(prompts, events)}
