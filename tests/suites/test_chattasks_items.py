"""chattasks' adapter training items: composites with worked examples (shots) before the question, and the loss
on the adapter's own answer line only, never on a shot's answer (which the adapter must not learn to copy)."""
import contextlib

import pytest
import torch

from meteora_moe import load_base_model, load_tokenizer
from suites.chattasks import ChatTasksConfig, split_samples
from suites.chattasks.items import CHAT, adapter_items
from suites.chattasks.jobs import train_adapter
from suites.chattasks.lora import (Item, encode_item, frozen_weights_in_bf16, lora_model, padded_batch, passes,
                                   step_gradients)
from tiny import write_tiny_gguf

TASKS = ("iso_date", "larger", "list_max", "join_commas")


@pytest.fixture(scope="module")
def data():
    return {task: split_samples(task, 20, 5, 0) for task in TASKS}


def config(**changes) -> ChatTasksConfig:
    recipes = tuple(r for r in ChatTasksConfig().recipes if r.task in TASKS)
    return ChatTasksConfig(recipes=recipes, n_train=20, n_eval=5, **changes)


def test_each_composite_item_comes_after_shots_of_as_many_problems_one_of_them_its_tasks(data):
    items = adapter_items(data, config(shots=2))["list_max"]
    own_prompts = {sample["prompt"] for sample in data["list_max"][0]}
    composites = [item for item in items if len(item.samples) > 1]
    assert len(composites) == 10 and all(not item.shots for item in items if len(item.samples) == 1)
    for item in composites:
        assert len(item.shots) == 2
        for prompt, response in item.shots:
            lines = prompt.split("\n")
            assert len(lines) == len(item.samples) == len(response.split("\n"))
            assert any(line.split(". ", 1)[1] in own_prompts for line in lines), prompt
    no_shots = adapter_items(data, config())["list_max"]
    assert len(no_shots) == len(items) and all(not item.shots for item in no_shots)


def test_the_loss_is_on_the_own_answer_line_only_never_on_a_shot(tmp_path, monkeypatch):
    monkeypatch.setenv("METEORA_CACHE", str(tmp_path / "cache"))
    tokenizer = load_tokenizer(write_tiny_gguf(tmp_path / "tiny.gguf"))
    samples = [{"prompt": "add one: 41", "response": "42"}, {"prompt": "Shout: hey you", "response": "HEY YOU"}]
    shot = ("1. add one: 9\n2. Shout: go", "1. 10\n2. GO")
    batch = padded_batch([encode_item(tokenizer, CHAT, item) for item in (Item(samples, 1, (shot,)), Item(samples[:1]))],
                         tokenizer.pad_token_id)
    labelled = [tokenizer.decode([t for t in row.tolist() if t != -100]) for row in batch["labels"]]
    assert labelled[0] == "2. HEY YOU<|im_end|>" and labelled[1] == "42<|im_end|>"
    prompt = tokenizer.decode(batch["input_ids"][0][:int(batch["first_label"][0])])
    assert prompt.index("1. add one: 9") < prompt.index("1. 10\n2. GO") < prompt.index("1. add one: 41")
    assert "add one: 9" not in tokenizer.decode(batch["input_ids"][1])


def tiny_lora(tmp_path, monkeypatch):
    """A LoRA on a tiny GGUF model, its B not zero (B starts at zero: this gives A a gradient too), and its tokenizer."""
    monkeypatch.setenv("METEORA_CACHE", str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = lora_model(load_base_model(gguf), 4, ("q_proj", "v_proj"), False, seed=0), load_tokenizer(gguf)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    return model, tokenizer


def test_bad_composite_settings_are_refused():
    for changes, message in (({"composite_max": 1}, "composite_max must be >= 2, got 1"),
                             ({"composite_share": 1.5}, r"composite_share must be in \[0, 1\], got 1.5"),
                             ({"shots": -1}, "shots must be >= 0, got -1")):
        with pytest.raises(ValueError, match=message):
            config(**changes)


def test_a_batch_is_cut_into_the_cheapest_passes():
    assert passes([2, 2, 9, 9], pass_cost=1) == [slice(0, 2), slice(2, 4)]  # 2 * 2 + 1 + 2 * 9 + 1 < 4 * 9 + 1
    assert passes([2, 2, 9, 9], pass_cost=100) == [slice(0, 4)]  # 4 * 9 + 100 < 2 * 2 + 2 * 9 + 200
    assert passes([5], pass_cost=40) == [slice(0, 1)]


def test_a_step_in_passes_has_the_gradient_of_one_pass_over_the_padded_batch(tmp_path, monkeypatch):
    model, tokenizer = tiny_lora(tmp_path, monkeypatch)
    samples = [{"prompt": f"add one: {i}" * (1 + i % 3), "response": str(i + 1)} for i in range(6)]
    composites = [[samples[(i + j) % 6] for j in range(1 + i % 3)] for i in range(6)]  # of 1, 2 and 3 problems
    rows = [encode_item(tokenizer, CHAT, Item(problems, i % len(problems))) for i, problems in enumerate(composites)]
    gradients = {}
    lengths = sorted(len(ids) for ids, _ in rows)
    assert len(passes(lengths, 10**6)) == 1 and len(passes(lengths, 0)) > 1
    for pass_cost in (10**6, 0):  # one pass; passes of rows of one length
        model.zero_grad()
        loss = step_gradients(model, rows, tokenizer.pad_token_id, pass_cost)
        gradients[pass_cost] = loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]
    (one_loss, one), (passes_loss, in_passes) = gradients[10**6], gradients[0]
    assert passes_loss == pytest.approx(one_loss, rel=1e-5)
    for a, b in zip(one, in_passes):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_frozen_weights_cast_once_give_autocasts_loss_and_gradients_and_come_back(tmp_path, monkeypatch):
    model, tokenizer = tiny_lora(tmp_path, monkeypatch)
    samples = [{"prompt": f"add one: {i}" * (1 + i % 3), "response": str(i + 1)} for i in range(6)]
    rows = [encode_item(tokenizer, CHAT, Item(samples[i:i + 2], i % 2)) for i in range(5)]
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    results = []
    for cast_once in (False, True):
        model.zero_grad()
        with frozen_weights_in_bf16(model) if cast_once else contextlib.nullcontext():
            k_proj = model.base_model.model.model.layers[0].self_attn.k_proj
            assert k_proj.weight.dtype == (torch.bfloat16 if cast_once else torch.float32)
            loss = step_gradients(model, rows, tokenizer.pad_token_id, bf16=True)
        results.append((loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (autocast_loss, autocast_grads), (once_loss, once_grads) = results
    assert once_loss == autocast_loss and all(torch.equal(a, b) for a, b in zip(autocast_grads, once_grads))
    after = model.state_dict()
    assert all(after[name].dtype == value.dtype and torch.equal(after[name], value) for name, value in before.items())


def test_an_adapter_trains_by_its_recipe_and_leaves_the_models_attention_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setenv("METEORA_CACHE", str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    base, tokenizer = load_base_model(gguf), load_tokenizer(gguf)
    attention = base.config._attn_implementation
    samples = [{"prompt": f"add one: {i}", "response": str(i + 1)} for i in range(8)]
    items = [Item([s]) for s in samples] + [Item(samples[i:i + 3], 1) for i in range(5)]
    model = train_adapter(base, tokenizer, config(pass_cost=0), "list_max", items, steps=3)
    peft_config = model.peft_config["default"]
    assert (peft_config.r, set(peft_config.target_modules), peft_config.use_rslora) == (16, {"q_proj", "v_proj"}, True)
    moved = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert moved and all(p.abs().sum() > 0 for p in moved)  # B starts at zero
    assert model.config._attn_implementation == attention and not model.training
    assert not any("lora" in name for name, _ in base.named_parameters())  # a copy of the base was adapted
