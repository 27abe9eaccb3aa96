"""generate() works with the KV cache and returns the routing trace per generated token."""
import copy

import pytest
import torch
from transformers import GenerationConfig

from meteora_moe import MeteoraModel
from tiny import ALL_MODULES, make_adapter, random_ids, tiny_base


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_base()
    paths = {name: make_adapter(base, root / name, r, 2 * r, t, seed=i)
             for i, (name, r, t) in enumerate([("alpha", 4, ALL_MODULES), ("beta", 8, ALL_MODULES), ("gamma", 8, ["q_proj"])])}
    return MeteoraModel.from_adapters(copy.deepcopy(base), paths, top_k=2)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_returns_a_trace_per_generated_token(fused, use_cache):
    prompt = random_ids(batch=2, length=5)
    out = fused.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_routing=True,
                         use_cache=use_cache, pad_token_id=0)
    plain = fused.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out.sequences, plain)
    trace = out.routing
    n_layers = 2 * len(ALL_MODULES)
    assert trace.layers == fused.layer_names and len(trace.layers) == n_layers
    assert trace.ids.shape == (2, 5 + 6 - 1, n_layers, 2)  # every processed position
    generated = trace.for_generated(6)
    assert generated.ids.shape == (2, 6, n_layers, 2)
    torch.testing.assert_close(generated.weights.sum(-1), torch.ones(2, 6, n_layers))
    shares = generated.expert_weights()  # [B, n, E]
    torch.testing.assert_close(shares.sum(-1), torch.ones(2, 6))


def test_trace_matches_a_plain_forward_pass(fused):
    """The routing recorded during generation is the routing of the same positions in one forward pass."""
    prompt = random_ids(batch=1, length=4, seed=5)
    out = fused.generate(prompt, max_new_tokens=5, do_sample=False, return_routing=True, pad_token_id=0)
    with torch.no_grad(), fused.recording_routing() as recorder:
        fused(out.sequences[:, :-1])
    forward = recorder.trace(batch=1)
    assert torch.equal(out.routing.ids, forward.ids)
    torch.testing.assert_close(out.routing.weights, forward.weights)  # cached and full attention: float noise only


def test_forced_experts_show_in_the_trace(fused):
    with fused.force_experts(["gamma"]):
        out = fused.generate(random_ids(batch=1, length=3), max_new_tokens=3, return_routing=True, pad_token_id=0)
    assert (out.routing.ids == 2).all() and (out.routing.weights == 1).all()
    assert out.routing.top_experts()[0] == [("gamma", 1.0)]
    assert fused.routing.forced is None, "forcing ends with the block"


@torch.no_grad()
def test_teacher_routing_sends_each_token_to_its_expert(fused):
    inputs = random_ids(batch=2, length=6, seed=3)
    experts = torch.tensor([[0, 0, 0, 0, 0, 0], [2, 2, 1, 1, 0, 0]])
    with fused.recording_routing() as recorder, fused.route_tokens(experts):
        routed = fused(inputs).logits
    records = recorder.calls  # layer -> [(ids [B, S, k], weights)] per forward
    assert all(torch.equal(records[layer][0][0][..., 0], experts) for layer in fused.layer_names)
    with fused.force_experts(["alpha"]):
        assert torch.allclose(routed[0], fused(inputs[:1]).logits[0], atol=1e-6), "a row sent to alpha alone = alpha forced"
    assert fused.routing.token_experts is None, "teacher routing ends with the block"
    for bad in (torch.tensor([0, 1]), torch.tensor([[0, 3]]), torch.tensor([[0, -2]])):
        with pytest.raises(ValueError, match="route_tokens"), fused.route_tokens(bad):
            pass


@torch.no_grad()
def test_teacher_routing_leaves_tokens_marked_minus_one_to_the_gates(fused):
    inputs = random_ids(batch=2, length=6, seed=4)
    experts = torch.tensor([[-1, -1, -1, -1, -1, -1], [2, 2, -1, -1, 0, -1]])
    with fused.recording_routing() as recorder:
        gated = fused(inputs).logits
        with fused.route_tokens(experts):
            mixed = fused(inputs).logits
    records = recorder.calls  # layer -> [(ids [B, S, k], weights)] of the plain and the taught forward
    torch.testing.assert_close(mixed[0], gated[0], rtol=0, atol=1e-6)  # a row left to the gates is routed as usual
    assert not torch.allclose(mixed[1], gated[1], atol=1e-3), "the taught tokens changed the row"
    taught = experts[1] >= 0
    for layer in fused.layer_names:
        _, (ids, weights) = records[layer]
        assert torch.equal(ids[1, taught, 0], experts[1, taught]) and (weights[1, taught] == torch.tensor([1.0, 0.0])).all()
    first = fused.layer_names[0]  # its input does not depend on any routing yet: the gates pick as in the plain pass
    assert torch.equal(records[first][1][0][1, ~taught], records[first][0][0][1, ~taught])


def test_sampling_with_routing_and_beam_search_refused(fused):
    torch.manual_seed(0)
    out = fused.generate(random_ids(batch=2, length=3), max_new_tokens=4, do_sample=True, return_routing=True, pad_token_id=0)
    assert out.routing.ids.shape[1] == out.sequences.shape[1] - 1
    with pytest.raises(ValueError, match="beam"):
        fused.generate(random_ids(batch=1, length=3), max_new_tokens=2, num_beams=2, return_routing=True)


def test_beams_from_any_generation_config_are_refused(fused):
    """generate reads num_beams from its kwargs, then the generation_config given, then the model's own."""
    prompt = random_ids(batch=1, length=3)
    with pytest.raises(ValueError, match="beam search"):
        fused.generate(prompt, generation_config=GenerationConfig(num_beams=2, max_new_tokens=2), return_routing=True)
    with pytest.raises(ValueError, match="beam search"):
        fused.generate(prompt, GenerationConfig(num_beams=2, max_new_tokens=2), return_routing=True)
    fused.base_model.generation_config.num_beams = 2
    try:
        with pytest.raises(ValueError, match="beam search"):
            fused.generate(prompt, max_new_tokens=2, pad_token_id=0, return_routing=True)
        out = fused.generate(prompt, max_new_tokens=2, num_beams=1, pad_token_id=0, return_routing=True)
        assert out.routing.ids.shape[1] == out.sequences.shape[1] - 1, "num_beams=1 given overrides the model's"
    finally:
        fused.base_model.generation_config.num_beams = 1


def test_return_dict_in_generate_may_be_passed_too(fused):
    out = fused.generate(random_ids(batch=1, length=3), max_new_tokens=2, pad_token_id=0, return_routing=True,
                         return_dict_in_generate=True)
    assert out.routing.ids.shape[1] == out.sequences.shape[1] - 1


def test_a_trace_that_misses_positions_is_refused(fused):
    """From inputs_embeds the sequences hold only the new tokens: the trace cannot be laid against them."""
    embeds = fused.base_model.get_input_embeddings()(random_ids(batch=1, length=5))
    with torch.no_grad(), pytest.raises(ValueError, match="recorded 7 positions for sequences of 3 tokens"):
        fused.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=False, pad_token_id=0, return_routing=True)


def test_for_generated_takes_zero_to_all_positions(fused):
    trace = fused.generate(random_ids(batch=2, length=3), max_new_tokens=2, pad_token_id=0, return_routing=True).routing
    assert trace.for_generated(0).ids.shape[1] == 0 and trace.for_generated(0).expert_weights().shape[1] == 0
    assert torch.equal(trace.for_generated(4).ids, trace.ids)
    for n in (-1, 5):
        with pytest.raises(ValueError, match="for_generated needs 0 <= n <= 4"):
            trace.for_generated(n)
