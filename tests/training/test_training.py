"""Gate-training building blocks: the loss, gates as the only trainable part, and routing that learns."""

import pytest
import torch

from meteora_moe import MeteoraModel, lm_labels, meteora_loss, routing_accuracy, task_labels
from tiny import ALL_MODULES, VOCAB, make_adapter, tiny_base

N_TASKS = 4
BAND = VOCAB // N_TASKS  # task e's sequences use tokens [e * BAND, (e + 1) * BAND): a task the gates can sense


def task_batch(batch: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tasks = torch.randint(0, N_TASKS, (batch,), generator=g)
    ids = tasks[:, None] * BAND + torch.randint(0, BAND, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length - 3:] = 0  # one right-padded row
    return ids, mask, tasks


@pytest.fixture
def fused(tmp_path):
    base = tiny_base()
    paths = {f"task{e}": make_adapter(base, tmp_path / f"t{e}", (4, 8)[e % 2], 8, ALL_MODULES, seed=e) for e in range(N_TASKS)}
    return MeteoraModel.from_adapters(base, paths, top_k=2, backend="torch")


def test_lm_part_equals_transformers_loss_and_padding_is_ignored(fused):
    ids, mask, tasks = task_batch(4, 12, seed=0)
    labels = lm_labels(ids, mask)
    with fused.capture_gate_logits() as gate_logits:
        out = fused(input_ids=ids, attention_mask=mask, labels=labels)
    loss = meteora_loss(out.logits, labels, gate_logits, task_labels(tasks, mask), gate_weight=50.0)
    torch.testing.assert_close(loss.lm, out.loss)
    assert len(gate_logits) == len(fused.layers) and gate_logits[0].shape == (4 * 12, N_TASKS)
    torch.testing.assert_close(loss.total, loss.lm + 50.0 * loss.gate)


def test_prompt_tokens_can_be_excluded_from_the_lm_loss():
    ids = torch.arange(12).view(2, 6)
    labels = lm_labels(ids, torch.ones_like(ids), prompt_lengths=torch.tensor([2, 4]))
    assert labels.tolist() == [[-100, -100, 2, 3, 4, 5], [-100, -100, -100, -100, 10, 11]]


def test_only_gates_train(fused):
    ids, mask, tasks = task_batch(4, 12, seed=1)
    frozen = {n: t.clone() for n, t in fused.state_dict().items() if "meteora_gate" not in n}
    experts = {n: l.meteora_experts.A.clone() for n, l in fused.layers.items()}
    gates_before = [g.detach().clone() for g in fused.gate_parameters()]
    trainable = [p for p in fused.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(g) for g in fused.gate_parameters()}
    optimizer = torch.optim.SGD(fused.gate_parameters(), lr=0.1)
    with fused.capture_gate_logits() as gate_logits:
        out = fused(input_ids=ids, attention_mask=mask)
    meteora_loss(out.logits, lm_labels(ids, mask), gate_logits, task_labels(tasks, mask)).total.backward()
    optimizer.step()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in fused.gate_parameters())
    assert all(not torch.equal(a, b) for a, b in zip(gates_before, fused.gate_parameters()))
    assert all(torch.equal(t, fused.state_dict()[n]) for n, t in frozen.items())
    assert all(torch.equal(a, fused.layers[n].meteora_experts.A) for n, a in experts.items())


def _accuracy(model, seed):
    ids, mask, tasks = task_batch(32, 16, seed=seed)
    with torch.no_grad(), model.capture_gate_logits() as gate_logits:
        model(input_ids=ids, attention_mask=mask)
    return routing_accuracy(gate_logits, task_labels(tasks, mask))


def test_a_few_hundred_steps_raise_routing_accuracy(fused):
    before = _accuracy(fused, seed=999)
    optimizer = torch.optim.Adam(fused.gate_parameters(), lr=5e-3)
    for step in range(200):
        ids, mask, tasks = task_batch(16, 16, seed=step)
        with fused.capture_gate_logits() as gate_logits:
            out = fused(input_ids=ids, attention_mask=mask)
        loss = meteora_loss(out.logits, lm_labels(ids, mask), gate_logits, task_labels(tasks, mask))
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
    after = _accuracy(fused, seed=999)
    assert before < 0.5 and after > 0.9, (before, after)
