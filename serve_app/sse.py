"""Streamed responses: server-sent events in OpenAI's chunk format."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

from meteora_moe.errors import GenerationFailed

from .responses import routing_trace


async def sse_chunks(service, prompts, params, kind, header, routing: bool, include_usage: bool) -> AsyncIterator[str]:
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
                    choice["routing"] = routing_trace(events)
                yield chunk(choice)
    except GenerationFailed as error:
        yield f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error', 'param': None, 'code': 'generation_failed'}})}\n\n"
    if include_usage:
        prompt_tokens = sum(map(len, prompts))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts), "total_tokens": prompt_tokens + sum(counts)}
        yield f"data: {json.dumps({**header, 'object': chunk_kind, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"
