"""--init-from for any change of the adapters (issue 18), through the Ray Train job: old experts on attention only
plus a new one on the MLP (its rows fitted), then an updated adapter (its rows trained by SGD). With freeze_old the
copied rows must come out exactly as the earlier checkpoint held them; every result loads and serves. A removed
adapter: tests/pipelines/test_workflow.py."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meteora_moe import MeteoraModel
from meteora_moe.registry import Registry, load_manifest
from pipelines.collect_adapters import collect
from pipelines.train_config import load_train_config
from pipelines.train_gates import train
from tiny import assert_serves, write_world

pytestmark = pytest.mark.usefixtures("local_ray")
ATTENTION = {"reverse": ["q_proj", "v_proj"], "upper": ["q_proj", "k_proj", "v_proj", "o_proj"]}
MLP = {"length": ["gate_proj", "up_proj", "down_proj"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("init-from")
    manifest = write_world(root / "v1", {"reverse": 4, "upper": 8, "length": 2}, targets={**ATTENTION, **MLP})
    assert collect(load_manifest(manifest), str(root / "registry")).committed
    return root


def run(world: Path, name: str, experts: list[str], **extra) -> dict:
    values = {"registry": world / "registry", "storage_path": world / "runs", "name": name, "experts": f"[{', '.join(experts)}]",
              "num_workers": 1, "steps": 6, "batch": 8, "checkpoint_every": 3, "eval_samples": 8, "lr": 0.05, **extra}
    return train(load_train_config(None, [f"{k}={v}" for k, v in values.items()]))


def gates(summary: dict) -> dict[str, torch.Tensor]:
    return {k.removesuffix(".gate"): v for k, v in load_file(Path(summary["output"]) / "gates.safetensors").items()}


def earlier_checkpoint(world: Path, experts: list[str]) -> dict:
    """A checkpoint of the registry's adapters made with the library (random gates): where it came from does not
    matter to --init-from, only its base and experts."""
    registry = Registry(str(world / "registry"))
    model = MeteoraModel.from_adapters(registry.base_model["uri"], registry.adapter_dirs(experts), seed=7,
                                       prompt_format=registry.prompt_format(experts))
    model.save_pretrained(world / "earlier")
    return {"output": str(world / "earlier")}


def test_new_modules_and_an_updated_adapter_start_from_the_earlier_checkpoint(world):
    attention = earlier_checkpoint(world, ["reverse", "upper"])
    old = gates(attention)
    assert all(".self_attn." in module for module in old)  # only attention modules were adapted

    # + an expert on the MLP: the attention gates keep reverse's and upper's rows, the MLP gates are new
    grown = run(world, "mlp", ["reverse", "upper", "length"], init_from=attention["output"], freeze_old="true")
    new = gates(grown)
    warm = grown["warm_start"]
    assert grown["method"] == "fit"  # the default: only the fresh rows are fitted
    assert warm["experts"] == {"reverse": "copied", "upper": "copied", "length": "fresh"}
    assert warm["init_from"] == attention["output"]
    assert {m for m, how in warm["modules"].items() if how == "new"} == {m for m in new if ".mlp." in m} != set()
    for module, rows in old.items():
        assert torch.equal(new[module][:2], rows), module  # copied and frozen: exactly the checkpoint's
    assert_serves(grown["output"])

    # upper updated (same name, new weights): its rows start fresh, the others' are copied; the loop trains only them
    update = write_world(world / "v2", {"upper": 8}, targets=ATTENTION, seed=1)
    assert [row["status"] for row in collect(load_manifest(update), str(world / "registry")).rows] == ["new version"]
    updated = run(world, "updated", ["reverse", "upper", "length"], init_from=grown["output"], freeze_old="true",
                  method="sgd")
    assert updated["warm_start"]["experts"] == {"reverse": "copied", "upper": "fresh", "length": "copied"}
    after_update = gates(updated)
    for module, rows in new.items():
        assert torch.equal(after_update[module][[0, 2]], rows[[0, 2]]) and not torch.equal(after_update[module][1], rows[1])
    assert_serves(updated["output"])
