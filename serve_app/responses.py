"""Whole response bodies: a choice (completion or chat), the usage counts, the routing extension."""
from __future__ import annotations

from meteora_moe.serving import TokenEvent


def response_choice(kind: str, index: int, events: list[TokenEvent], routing: bool) -> dict:
    text, finish = "".join(e.text for e in events), events[-1].finish_reason
    choice = ({"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
              if kind == "chat.completion" else {"index": index, "text": text, "finish_reason": finish, "logprobs": None})
    if routing:
        choice["routing"] = routing_trace(events)
    return choice


def routing_trace(events: list[TokenEvent]) -> list[dict]:
    return [{"token": e.token, "experts": e.routing} for e in events]


def usage(prompts: list[list[int]], events: list[list[TokenEvent]]) -> dict:
    prompt_tokens, completion_tokens = sum(map(len, prompts)), sum(map(len, events))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
