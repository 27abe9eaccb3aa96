"""GenerationEngine: continuous batching of many generation requests over one MeteoRA model.

    submit(...) ──► waiting ──step()──►  decode   every running request gets one token (one forward per cohort)
                                         admit    waiting requests are prefilled together and join the batch
A request joins at the next step after it arrives, not when the running batch drains, and each one stops on its
own: EOS, a stop string, max_tokens, or the model's context window. Requests are grouped in cohorts by their
forced experts (none = the gates route every token), one BatchedCache per cohort: requests for different tasks
share one forward pass and the gates pick the adapters per token, which adapter-per-request servers cannot do.

Every forward records its routing; each generated token carries the experts' weights (mean over the adapted
layers) at the position that produced it. Not thread-safe except `submit` and `cancel`: one thread steps.
"""
from __future__ import annotations

import contextlib
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from ..batching import pad_left, position_ids
from ..model import MeteoraModel
from .batched_cache import BatchedCache
from .requests import FinishReason, SamplingParams, ServingLimits, TokenEvent, check_request

@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    released: int = 0  # characters of the text already sent out
    finish_reason: FinishReason | None = None


@dataclass
class _Cohort:
    requests: list[_Request]
    cache: BatchedCache


class GenerationEngine:
    def __init__(self, model: MeteoraModel, tokenizer, limits: ServingLimits = ServingLimits()):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_batch_size = limits.max_batch_size
        self.max_context = model.base_model.config.max_position_embeddings
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._waiting: deque[_Request] = deque()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._cohorts: dict[tuple[str, ...], _Cohort] = {}
        self._live: set[str] = set()  # submitted and not yet finished, cancelled or aborted: what abort_all reaches

    # ---- called from any thread ----------------------------------------------------------------------------
    def check(self, prompt_ids: list[int], params: SamplingParams, param: str = "prompt") -> None:
        """Raise the RequestError (meteora_moe.errors) that says why this request cannot run; submit calls it too."""
        check_request(prompt_ids, params, self.limits, self.max_context, param)
        if params.experts:
            self.model.expert_ids(params.experts)

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.check(prompt_ids, params)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        request = _Request(request_id, list(prompt_ids), params, torch.Generator().manual_seed(seed))
        with self._lock:
            self._waiting.append(request)
            self._live.add(request_id)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    # ---- called from the stepping thread -------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(len(c.requests) for c in self._cohorts.values())

    def has_work(self) -> bool:
        return bool(self._cohorts or self._waiting)

    def step(self) -> list[TokenEvent]:
        """One token for every running request, and the first token for newly admitted ones."""
        self._drop_cancelled()
        events = []
        for key in list(self._cohorts):
            events += self._decode(key)
        events += self._admit()
        with self._lock:  # a request is live until its last event is out: a step that raises reaches it still
            self._live.difference_update(e.request_id for e in events if e.finish_reason is not None)
        return events

    def abort_all(self) -> list[str]:
        """Forget every request (after a failed step), also those the failed step had taken up; returns their ids."""
        with self._lock:
            ids = sorted(self._live)
            self._live.clear()
            self._waiting.clear()
            self._cancelled.clear()
        self._cohorts.clear()
        return ids

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[TokenEvent]]:
        """Run `prompts` to completion together (offline use and tests): each prompt's events in order."""
        for i, prompt in enumerate(prompts):
            self.submit(str(i), prompt, params)
        events: dict[str, list[TokenEvent]] = {str(i): [] for i in range(len(prompts))}
        while self.has_work():
            for event in self.step():
                events[event.request_id].append(event)
        return [events[str(i)] for i in range(len(prompts))]

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            self._waiting = deque(r for r in self._waiting if r.id not in cancelled)
            self._live -= cancelled
        for key, cohort in list(self._cohorts.items()):
            keep = [i for i, r in enumerate(cohort.requests) if r.id not in cancelled]
            self._keep(key, keep)

    def _decode(self, key: tuple[str, ...]) -> list[TokenEvent]:
        cohort = self._cohorts[key]
        ids = torch.tensor([[r.tokens[-1]] for r in cohort.requests])  # [B, 1] the last sampled tokens
        positions = cohort.cache.positions()  # [B, 1]
        mask = cohort.cache.extend_mask()  # [B, W + 1]
        logits, routing = self._forward(ids, mask, positions, cohort.cache, key)
        events = [self._emit(r, logits[i], routing[i]) for i, r in enumerate(cohort.requests)]
        self._keep(key, [i for i, r in enumerate(cohort.requests) if r.finish_reason is None])
        return events

    def _admit(self) -> list[TokenEvent]:
        with self._lock:
            count = min(len(self._waiting), self.max_batch_size - self.running)
            newcomers = [self._waiting.popleft() for _ in range(count)]
        groups: dict[tuple[str, ...], list[_Request]] = {}
        for request in newcomers:
            groups.setdefault(request.params.experts, []).append(request)
        events = []
        for key, requests in groups.items():
            batch = pad_left([r.prompt for r in requests], self.pad_id)  # [n, P]
            mask = batch["attention_mask"]
            cache = BatchedCache.empty(mask)
            logits, routing = self._forward(batch["input_ids"], mask, position_ids(mask), cache, key)
            events += [self._emit(r, logits[i], routing[i]) for i, r in enumerate(requests)]
            alive = [i for i, r in enumerate(requests) if r.finish_reason is None]
            if alive:
                joined = _Cohort([requests[i] for i in alive], cache.select(alive))
                if key in self._cohorts:
                    old = self._cohorts[key]
                    joined = _Cohort(old.requests + joined.requests, old.cache.join(joined.cache))
                self._cohorts[key] = joined
        return events

    def _keep(self, key: tuple[str, ...], rows: list[int]) -> None:
        cohort = self._cohorts[key]
        if not rows:
            del self._cohorts[key]
        elif len(rows) < len(cohort.requests):
            self._cohorts[key] = _Cohort([cohort.requests[i] for i in rows], cohort.cache.select(rows))

    def _forward(self, ids, mask, positions, cache: BatchedCache, experts: tuple[str, ...]):
        """-> logits of each row's last position [B, V] fp32 (CPU), routing weights there [B, E]."""
        device = self.model.device
        forcing = self.model.force_experts(experts) if experts else contextlib.nullcontext()
        with torch.inference_mode(), forcing, self.model.recording_routing() as recorder:
            out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), cache=cache.cache, use_cache=True)
        trace = recorder.trace(ids.shape[0])
        return out.logits[:, -1].float().cpu(), trace.for_generated(1).expert_weights()[:, 0]

    def _emit(self, request: _Request, logits: torch.Tensor, weights: torch.Tensor) -> TokenEvent:
        """Sample the request's next token from `logits` [V] and say what changed."""
        params = request.params
        token = _sample(logits, params, request.generator)
        request.tokens.append(token)
        text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
        cut = _first_stop(text, params.stop)
        if (token == self.tokenizer.eos_token_id and not params.ignore_eos) or cut is not None:
            request.finish_reason = "stop"
        elif len(request.tokens) >= params.max_tokens or len(request.prompt) + len(request.tokens) >= self.max_context:
            request.finish_reason = "length"
        end = cut if cut is not None else len(text) if request.finish_reason else _releasable(text, params.stop)
        delta, request.released = text[request.released : end], max(request.released, end)
        order = weights.argsort(descending=True).tolist()
        routing = {self.model.expert_names[e]: round(weights[e].item(), 4) for e in order if weights[e] > 0}
        piece = "" if token == self.tokenizer.eos_token_id else self.tokenizer.decode([token])
        return TokenEvent(request.id, token, piece, delta, routing, request.finish_reason)


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits [V] fp32 -> a token id: greedy at temperature 0, else nucleus sampling."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)  # a tiny temperature: -inf, not NaN
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p  # tokens after the nucleus is full
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(outside, 0))
    return int(torch.multinomial(probs, 1, generator=generator))


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _releasable(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can go out: not a tail that may begin a stop string, nor a half-decoded character."""
    end = len(text.rstrip("\ufffd"))
    held = [next((k for k in range(min(len(s) - 1, end), 0, -1) if text[:end].endswith(s[:k])), 0) for s in stops]
    return end - max(held, default=0)
