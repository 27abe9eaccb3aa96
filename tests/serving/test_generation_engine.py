"""Continuous batching gives every request exactly what transformers' generate gives it alone."""
import asyncio
import copy

import pytest
import torch

from meteora_moe import MeteoraModel
from meteora_moe.errors import InvalidRequest, PromptTooLong, UnknownExpert
from suites.tinytasks import char_tokenizer
from meteora_moe.serving import AsyncEngine, GenerationEngine, SamplingParams, ServingLimits
from tiny import ALL_MODULES, make_adapter, tiny_base

TOKENIZER = char_tokenizer()
PROMPTS = ["reverse: abc\n", "sort: dcba\n", "upper: hello world\n", "x", "double: ab\n", "length: abcdefgh\n"]


def fused_model(tmp_path_factory, arch: str = "llama") -> MeteoraModel:
    root = tmp_path_factory.mktemp(f"adapters-{arch}")
    base = tiny_base(arch, vocab=len(TOKENIZER))
    paths = {name: make_adapter(base, root / name, r, 2 * r, t, seed=i)
             for i, (name, r, t) in enumerate([("alpha", 4, ALL_MODULES), ("beta", 8, ALL_MODULES), ("gamma", 8, ["q_proj"])])}
    return MeteoraModel.from_adapters(copy.deepcopy(base), paths, top_k=2)


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    return fused_model(tmp_path_factory)


def ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def reference(model: MeteoraModel, prompt: str, max_tokens: int, experts=()):
    """transformers' greedy generate for this prompt alone: generated ids and routing per generated token [n, E]."""
    forcing = model.force_experts(experts) if experts else torch.no_grad()
    with forcing, torch.no_grad():
        out = model.generate(torch.tensor([ids(prompt)]), max_new_tokens=max_tokens, do_sample=False, return_routing=True,
                             eos_token_id=TOKENIZER.eos_token_id, pad_token_id=TOKENIZER.pad_token_id)
    n = out.sequences.shape[1] - len(ids(prompt))
    return out.sequences[0, -n:].tolist(), out.routing.for_generated(n).expert_weights()[0]


def run_staggered(engine: GenerationEngine, requests: list[tuple[str, SamplingParams]], join_every: int = 2):
    """Submit the requests two at a time, `join_every` steps apart, while earlier ones are still decoding."""
    events = {str(i): [] for i in range(len(requests))}
    pending = list(enumerate(requests))
    steps = 0
    while pending or engine.has_work():
        if pending and steps % join_every == 0:
            for i, (prompt, params) in pending[:2]:
                engine.submit(str(i), ids(prompt), params)
            pending = pending[2:]
        for event in engine.step():
            events[event.request_id].append(event)
        steps += 1
    return [events[str(i)] for i in range(len(requests))]


def routing_matrix(events, experts: list[str]) -> torch.Tensor:
    return torch.tensor([[e.routing.get(name, 0.0) for name in experts] for e in events])


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_requests_joining_a_running_batch_get_what_they_get_alone(tmp_path_factory, arch):
    model = fused_model(tmp_path_factory, arch)
    requests = [(p, SamplingParams(max_tokens=4 + 3 * (i % 3), temperature=0, experts=("beta",) if i == 3 else ()))
                for i, p in enumerate(PROMPTS)]
    results = run_staggered(GenerationEngine(model, TOKENIZER, ServingLimits(max_batch_size=8)), requests)
    for (prompt, params), events in zip(requests, results):
        tokens, routing = reference(model, prompt, params.max_tokens, params.experts)
        assert [e.token_id for e in events] == tokens, prompt
        torch.testing.assert_close(routing_matrix(events, model.expert_names), routing, atol=1e-3, rtol=0)
        assert events[-1].finish_reason in ("stop", "length") and all(e.finish_reason is None for e in events[:-1])
        assert "".join(e.text for e in events) == TOKENIZER.decode(tokens, skip_special_tokens=True)


def test_routing_mixes_experts_when_gated_and_is_forced_when_asked(fused):
    engine = GenerationEngine(fused, TOKENIZER)
    gated, forced = engine.generate([ids(PROMPTS[0])], SamplingParams(max_tokens=5, temperature=0))[0], None
    forced = engine.generate([ids(PROMPTS[0])], SamplingParams(max_tokens=5, temperature=0, experts=("gamma",)))[0]
    assert all(e.routing == {"gamma": 1.0} for e in forced)
    assert all(abs(sum(e.routing.values()) - 1) < 1e-3 and len(e.routing) >= 2 for e in gated)


def test_a_stop_string_ends_the_text_before_it_and_is_never_streamed(fused):
    engine = GenerationEngine(fused, TOKENIZER)
    prompt, sampled = ids(PROMPTS[2]), SamplingParams(max_tokens=16, temperature=1.0, seed=0)
    full = "".join(e.text for e in engine.generate([prompt], sampled)[0])
    assert len(full) >= 8, full
    stop = full[5:7]
    events = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=1.0, seed=0, stop=(stop, "never-there")))[0]
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == full[: full.find(stop)]
    assert all(stop not in e.text for e in events)


def test_sampling_follows_the_seed_and_a_tiny_top_p_is_greedy(fused):
    engine = GenerationEngine(fused, TOKENIZER)
    prompt = [ids(PROMPTS[1])]

    def tokens(**kwargs):
        return [e.token_id for e in engine.generate(prompt, SamplingParams(max_tokens=12, **kwargs))[0]]

    assert tokens(temperature=1.5, seed=1) == tokens(temperature=1.5, seed=1)
    assert len({tuple(tokens(temperature=1.5, seed=s)) for s in range(4)}) > 1
    assert tokens(temperature=1.0, top_p=1e-6, seed=3) == tokens(temperature=0)


def test_cancelled_requests_leave_and_the_batch_size_is_bounded(fused):
    engine = GenerationEngine(fused, TOKENIZER, ServingLimits(max_batch_size=2))
    for i, prompt in enumerate(PROMPTS[:5]):
        engine.submit(str(i), ids(prompt), SamplingParams(max_tokens=6, temperature=0))
    seen, finished = [], set()
    engine.step()
    engine.cancel("0")
    while engine.has_work():
        assert engine.running <= 2
        for event in engine.step():
            seen.append(event.request_id)
            if event.finish_reason:
                finished.add(event.request_id)
    assert "0" not in seen and finished == {"1", "2", "3", "4"}


def test_a_failed_step_aborts_every_request_it_had_taken_up(fused, monkeypatch):
    """Requests being prefilled, and one that finished earlier in the failed step, are aborted too: none is lost."""
    engine = GenerationEngine(fused, TOKENIZER)
    forward, calls = engine._forward, []

    def failing_at(n: int):
        def patched(*args):
            calls.append(1)
            if len(calls) == n:
                raise RuntimeError("out of memory")
            return forward(*args)
        return patched

    engine.submit("new", ids(PROMPTS[0]), SamplingParams(max_tokens=5, temperature=0))
    monkeypatch.setattr(engine, "_forward", failing_at(1))  # its prefill fails
    with pytest.raises(RuntimeError):
        engine.step()
    assert engine.abort_all() == ["new"] and not engine.has_work()

    calls.clear()
    monkeypatch.setattr(engine, "_forward", failing_at(4))  # step 2: "short" finishes, then the forced cohort fails
    engine.submit("short", ids(PROMPTS[1]), SamplingParams(max_tokens=2, temperature=0))
    engine.submit("long", ids(PROMPTS[2]), SamplingParams(max_tokens=5, temperature=0, experts=("alpha",)))
    assert [e.request_id for e in engine.step()] == ["short", "long"]
    with pytest.raises(RuntimeError):
        engine.step()
    assert engine.abort_all() == ["long", "short"]

    monkeypatch.setattr(engine, "_forward", forward)  # and the engine carries on
    assert engine.generate([ids(PROMPTS[0])], SamplingParams(max_tokens=3, temperature=0))[0][-1].finish_reason == "length"


def test_requests_are_checked_against_the_context_window_and_the_experts(fused):
    engine = GenerationEngine(fused, TOKENIZER)
    window = fused.base_model.config.max_position_embeddings
    events = engine.generate([[5] * (window - 3)], SamplingParams(max_tokens=3, temperature=0))[0]
    assert len(events) <= 3 and events[-1].finish_reason in ("length", "stop")
    with pytest.raises(InvalidRequest, match="context window"):
        engine.submit("w", [5] * (window - 3), SamplingParams(max_tokens=4))
    with pytest.raises(PromptTooLong, match="the limit is"):
        engine.submit("x", [5] * window, SamplingParams())
    with pytest.raises(UnknownExpert, match="unknown experts"):
        engine.submit("y", [5], SamplingParams(experts=("nope",)))
    assert engine.waiting == 0, "a refused request is not queued"


def test_generation_stops_at_eos_unless_told_to_ignore_it(fused):
    first = GenerationEngine(fused, TOKENIZER).generate([ids(PROMPTS[0])], SamplingParams(max_tokens=1, temperature=0))[0][0]
    tokenizer = copy.deepcopy(TOKENIZER)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(first.token_id)  # the first greedy token now ends the text
    engine = GenerationEngine(fused, tokenizer)
    stopped = engine.generate([ids(PROMPTS[0])], SamplingParams(max_tokens=6, temperature=0))[0]
    assert len(stopped) == 1 and stopped[0].finish_reason == "stop"
    kept = engine.generate([ids(PROMPTS[0])], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert len(kept) == 6 and kept[-1].finish_reason == "length"


def test_async_streams_batch_together_and_a_consumer_that_leaves_cancels_its_request(fused):
    steps = []
    engine = AsyncEngine(GenerationEngine(fused, TOKENIZER), on_step=lambda events: steps.append([e.request_id for e in events]))
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def take(n: int) -> list:
        events = []
        async for event in engine.stream(ids(PROMPTS[0]), params):
            events.append(event)
            if len(events) == n:
                break  # the consumer leaves (a client disconnect)
        return events

    async def scenario():
        return await asyncio.gather(take(3), take(200))

    try:
        short, full = asyncio.run(scenario())
        assert len(short) == 3 and len(full) == 200 and full[-1].finish_reason == "length"
        assert max(len(ids_) for ids_ in steps) == 2  # the two requests shared decoding steps
        left = short[0].request_id
        assert sum(left in ids_ for ids_ in steps) < 20  # cancelled soon after it left, not decoded to 200 tokens
        assert not engine.engine.has_work()
    finally:
        engine.close()
    assert not engine.alive
