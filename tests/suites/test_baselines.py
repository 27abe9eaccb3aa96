"""The merged baseline is the uniform average of its adapters' weight deltas, whatever the first adapter is (peft
copies the merged adapter's config from it: rsLoRA and a layer subset must not carry over)."""
import copy
import warnings

import torch
from peft import PeftModel

from suites.baselines import merged_adapter
from tiny import make_adapter, tiny_base


def weight_delta(model, base) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload().state_dict()
    return {key: merged[key] - value for key, value in base.state_dict().items()}


def test_merged_is_the_average_of_the_deltas_with_an_rslora_first_adapter_on_some_layers(tmp_path):
    base = tiny_base()
    make_adapter(base, tmp_path / "first", rank=16, alpha=8, rslora=True, layers_to_transform=[0], seed=1)
    make_adapter(base, tmp_path / "second", rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"),
                 layers_to_transform=[0, 1], seed=2)
    deltas = [weight_delta(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / task), base)
              for task in ("first", "second")]
    merged = weight_delta(merged_adapter(base, tmp_path, ["first", "second"]), base)
    for key, value in merged.items():
        torch.testing.assert_close(value, (deltas[0][key] + deltas[1][key]) / 2, atol=1e-6, rtol=1e-4, msg=key)
    assert any(value.abs().max() > 1e-3 for value in deltas[1].values())  # the deltas are not all zero
