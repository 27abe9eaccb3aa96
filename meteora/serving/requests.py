"""What a generation request is and may be: sampling parameters, the serving limits, and the one check of a
request against both and the model (typed errors a server maps to its status codes: meteora_moe.errors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidRequest, PromptTooLong

FinishReason = str  # "stop" (EOS or a stop string) | "length" (max_tokens or the context window)
MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # None = a fresh random seed
    stop: tuple[str, ...] = ()  # the text ends before the first stop string, which is not returned
    experts: tuple[str, ...] = ()  # forced experts with equal weights; () = the gates route
    ignore_eos: bool = False  # keep going after EOS until max_tokens (benchmarks: every request the same length)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens", "invalid_max_tokens")
        if not 0 <= self.temperature < math.inf:  # NaN fails too
            raise InvalidRequest(f"temperature must be finite and >= 0, got {self.temperature}", "temperature",
                                 "invalid_sampling")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p", "invalid_sampling")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise InvalidRequest(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings", "stop", "invalid_stop")


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int
    token: str  # this token's own text
    text: str  # text released since the previous event: held back while it may be the start of a stop string
    routing: dict[str, float]  # expert -> weight for this token, heaviest first, zero weights left out
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class ServingLimits:
    max_batch_size: int = 16  # requests decoded together
    max_waiting: int = 64  # requests queued behind a full batch before Busy
    max_prompt_tokens: int = 1024  # longer prompts: PromptTooLong
    max_tokens_limit: int = 512  # largest max_tokens accepted


def check_request(prompt: list[int], params: SamplingParams, limits: ServingLimits, context: int,
                  param: str = "prompt") -> None:
    """A request the engine can run: a prompt within the limits, room in the context window for max_tokens."""
    if not prompt:
        raise InvalidRequest("the prompt is empty", param, "empty_prompt")
    limit = min(limits.max_prompt_tokens, context - 1)
    if len(prompt) > limit:
        raise PromptTooLong(f"the prompt has {len(prompt)} tokens; the limit is {limit}", param, "prompt_too_long")
    if params.max_tokens > limits.max_tokens_limit:
        raise InvalidRequest(f"max_tokens={params.max_tokens} is above this server's limit of {limits.max_tokens_limit}",
                             "max_tokens", "max_tokens_too_large")
    if len(prompt) + params.max_tokens > context:
        raise InvalidRequest(f"the prompt and max_tokens={params.max_tokens} exceed the model's context window of "
                             f"{context} tokens", "max_tokens", "context_length_exceeded")
