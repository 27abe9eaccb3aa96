"""The library parts of distributed and incremental gate training (no Ray): resumable training state,
deterministic per-step data, and warm-starting the gates from an earlier checkpoint."""
import copy

import pytest
import torch

from meteora_moe import CheckpointError, MeteoraModel
from meteora_moe.training import init_gates_from, load_train_state, new_share, save_train_state, shard, step_samples
from tiny import ALL_MODULES, make_adapter, random_ids, tiny_base


@pytest.fixture
def adapters(tmp_path):
    base = tiny_base()
    return base, {name: make_adapter(base, tmp_path / name, rank, 2 * rank, ALL_MODULES, seed=rank)
                  for name, rank in (("a", 4), ("b", 8), ("c", 2))}


def fused(base, paths, names, seed=0):
    return MeteoraModel.from_adapters(copy.deepcopy(base), {n: paths[n] for n in names}, top_k=2, seed=seed)


def adam_steps(model, optimizer, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        with model.capture_gate_logits() as logits:
            model(input_ids=random_ids(2, 8))
        torch.stack(logits).square().mean().backward()
        optimizer.step()


def test_a_restored_training_state_continues_exactly(adapters, tmp_path):
    base, paths = adapters
    straight = fused(base, paths, "abc")
    optimizer = torch.optim.Adam(straight.gate_parameters(), lr=0.01)
    adam_steps(straight, optimizer, 3)
    save_train_state(tmp_path, straight, optimizer, step=3, extra={"history": [1, 2, 3]})
    adam_steps(straight, optimizer, 2)

    resumed = fused(base, paths, "abc", seed=1)  # other initial gates: all of it must come from the state
    resumed_optimizer = torch.optim.Adam(resumed.gate_parameters(), lr=0.01)
    assert load_train_state(tmp_path, resumed, resumed_optimizer) == (3, {"history": [1, 2, 3]})
    adam_steps(resumed, resumed_optimizer, 2)
    for a, b in zip(straight.gate_parameters(), resumed.gate_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="use another run name"):
        other = fused(base, paths, "ab")
        load_train_state(tmp_path, other, torch.optim.Adam(other.gate_parameters()))


def test_step_batches_depend_on_seed_step_and_rank_only():
    samples = [({"i": i}, i % 4) for i in range(100)]
    shards = [shard(samples, rank, 2, seed=0) for rank in (0, 1)]
    assert sorted(s[0]["i"] for part in shards for s in part) == list(range(100))  # disjoint and complete
    assert step_samples(shards[0], 7, 0, 8, seed=0) == step_samples(shard(samples, 0, 2, 0), 7, 0, 8, seed=0)
    assert step_samples(shards[0], 7, 0, 8, seed=0) != step_samples(shards[0], 8, 0, 8, seed=0)
    mixed = step_samples(shards[0], 3, 0, 8, seed=0, new_experts={3}, new_fraction=0.5)
    assert sum(task == 3 for _, task in mixed) == 4
    balanced = step_samples(shards[0], 3, 0, 8, seed=0, new_experts={3}, new_fraction=new_share(None, 1, 4))
    assert sum(task == 3 for _, task in balanced) == 2  # by default a new expert is drawn as often as an old one


def test_warm_start_keeps_trained_rows_of_shared_experts(adapters, tmp_path):
    base, paths = adapters
    old = fused(base, paths, "ab")
    with torch.no_grad():
        for gate in old.gate_parameters():
            gate.normal_()
    old.save_pretrained(tmp_path / "old")
    grown = fused(base, paths, "cab")  # a new expert first: rows are matched by name, not position
    warm = init_gates_from(grown, str(tmp_path / "old"))
    assert warm.new_experts == ["c"] and warm.experts == {"c": "fresh", "a": "copied", "b": "copied"}
    for before, after in zip(old.gate_parameters(), grown.gate_parameters()):
        torch.testing.assert_close(after[1:], before, rtol=0, atol=0)
        torch.testing.assert_close(after[0], (before[0] + before[1]) / 2)  # the new row: the old rows' mean
    assert all(mask.flatten().tolist() == [1.0, 0.0, 0.0] for mask in warm.trainable_rows(grown))


def test_warm_start_refuses_another_base_model(adapters, tmp_path):
    base, paths = adapters
    fused(base, paths, "ab").save_pretrained(tmp_path / "old")
    other_base = tiny_base(seed=5)  # same shapes, other weights
    other = MeteoraModel.from_adapters(other_base, {"a": paths["a"]}, top_k=1)
    with pytest.raises(CheckpointError, match="another base model"):
        init_gates_from(other, str(tmp_path / "old"))


def test_warm_start_across_target_modules_copies_shared_gates_and_starts_new_ones_fresh(tmp_path):
    base = tiny_base()
    paths = {"q": make_adapter(base, tmp_path / "q", 4, 8, ["q_proj", "v_proj"], seed=1),
             "mlp": make_adapter(base, tmp_path / "mlp", 8, 16, ["up_proj", "down_proj"], seed=2),
             "qo": make_adapter(base, tmp_path / "qo", 2, 4, ["q_proj", "o_proj"], seed=3)}
    old = fused(base, paths, ["q", "qo"])
    with torch.no_grad():
        for gate in old.gate_parameters():
            gate.normal_()
    old.save_pretrained(tmp_path / "old")
    old_gates = dict(zip(old.layer_names, old.gate_parameters()))
    grown = fused(base, paths, ["mlp", "q", "qo"], seed=3)
    initial = {name: gate.detach().clone() for name, gate in zip(grown.layer_names, grown.gate_parameters())}
    warm = init_gates_from(grown, str(tmp_path / "old"))
    assert warm.experts == {"mlp": "fresh", "q": "copied", "qo": "copied"}
    assert {m for m, how in warm.modules.items() if how == "new"} == {m for m in grown.layer_names if ".mlp." in m}
    for (name, gate), mask in zip(zip(grown.layer_names, grown.gate_parameters()), warm.trainable_rows(grown)):
        if name in old_gates:  # both adapt it: old rows copied, the new expert's row their mean
            torch.testing.assert_close(gate[1:], old_gates[name], rtol=0, atol=0)
            torch.testing.assert_close(gate[0], old_gates[name].mean(0))
            assert mask.flatten().tolist() == [1.0, 0.0, 0.0]
        else:  # only the new expert targets it: a fresh gate, every row trains
            torch.testing.assert_close(gate, initial[name], rtol=0, atol=0)
            assert mask.flatten().tolist() == [1.0, 1.0, 1.0]

    shrunk = fused(base, paths, ["qo", "mlp"])  # q removed: its rows are dropped
    warm = init_gates_from(shrunk, str(tmp_path / "old"))
    assert warm.experts == {"qo": "copied", "mlp": "fresh"}
    assert "model.layers.0.self_attn.v_proj" not in shrunk.layer_names  # no expert targets v_proj any more
    q_proj = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(dict(zip(shrunk.layer_names, shrunk.gate_parameters()))[q_proj][0], old_gates[q_proj][1])
