"""A CPU training step runs eager attention for short rows (CPU SDPA's backward is slow there) with SDPA's loss and
gradients, keeps SDPA where eager's attention weights would be large, and gives the model its own attention back."""
import contextlib

import torch

from meteora_moe.training import training_attention
from tiny import random_ids, tiny_base


def loss_and_gradients(model, ids, mask, context):
    model.zero_grad()
    with context as used:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
    return used, loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_short_rows_train_eager_with_sdpas_loss_and_gradients():
    model = tiny_base(attn="sdpa").train()
    ids = random_ids(batch=3, length=12)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # a right-padded row
    used, loss, grads = loss_and_gradients(model, ids, mask, training_attention(model, ids.shape))
    assert used == "eager" and model.config._attn_implementation == "sdpa"  # the model's own again after the step
    _, sdpa_loss, sdpa_grads = loss_and_gradients(model, ids, mask, contextlib.nullcontext("sdpa"))
    torch.testing.assert_close(loss, sdpa_loss)
    for grad, sdpa_grad in zip(grads, sdpa_grads):
        torch.testing.assert_close(grad, sdpa_grad, rtol=1e-4, atol=1e-6)


def test_long_rows_and_models_not_on_sdpa_keep_their_attention():
    model = tiny_base(attn="sdpa")
    with training_attention(model, torch.Size([16, 4096])) as used:  # 16 x 4 heads x 4096^2 x 4 bytes: 4 GiB a layer
        assert used == model.config._attn_implementation == "sdpa"
    with training_attention(tiny_base(attn="eager"), torch.Size([2, 8])) as used:
        assert used == "eager"
