"""The chattasks build runs its jobs in worker processes: on a tiny GGUF model, a whole build (adapters, LoRA-B,
merged, measurements, manifest) in 2 workers, each adapter bit for bit what one process trains by its recipe."""
import json
from dataclasses import replace

import pytest
import torch
import yaml
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from meteora_moe import load_base_model, load_tokenizer
from suites.chattasks import ChatTasksConfig
from suites.chattasks.build import WeakAdapters, _build_into, check_own_adapters
from suites.chattasks.items import adapter_items, task_data
from suites.chattasks.jobs import train_adapter
from tiny import write_tiny_gguf

TASKS = ("iso_date", "larger", "list_max")


def test_two_workers_build_what_one_process_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("METEORA_CACHE", str(tmp_path / "cache"))
    gguf, license_file = write_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "LICENSE"
    license_file.write_text("tiny")
    recipes = tuple(replace(r, steps=2) for r in ChatTasksConfig().recipes if r.task in TASKS)
    config = ChatTasksConfig(recipes=recipes, lora_b_steps=2, n_train=12, n_eval=4, report_samples=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the build gives each of 2 workers 1 thread; the reference below runs on 1 too
    try:
        _build_into(tmp_path / "suite", "file:///suite", config, gguf, license_file, workers=2, own_floor=0.0)
        torch.set_num_threads(1)
        base, tokenizer = load_base_model(gguf).eval(), load_tokenizer(gguf)
        items = adapter_items(task_data(config), config)
        expected = {task: get_peft_model_state_dict(train_adapter(base, tokenizer, config, task, items[task]))
                    for task in TASKS}
    finally:
        torch.set_num_threads(threads)
    suite = tmp_path / "suite"
    for task in TASKS:
        saved = load_file(suite / "adapters" / task / "adapter_model.safetensors")
        assert saved.keys() == expected[task].keys()
        assert all(torch.equal(saved[k], expected[task][k]) for k in saved), task
    assert (suite / "baselines" / "lora-b" / "adapter_model.safetensors").is_file()
    assert (suite / "baselines" / "merged" / "adapter_model.safetensors").is_file()
    report = json.loads((suite / "build_report.json").read_text())
    assert list(report["accuracy"]["own adapter"]) == list(TASKS) and list(report["accuracy"]["base"]) == list(TASKS)
    assert (report["workers"], report["threads_per_worker"]) == (2, 1)
    seconds = report["seconds"]
    assert set(seconds["adapters"]) == set(TASKS) and seconds["total"] > seconds["measuring"] > 0
    manifest = yaml.safe_load((suite / "manifest.yaml").read_text())
    assert [a["name"] for a in manifest["adapters"]] == list(TASKS)


def test_adapters_under_the_floor_stop_the_build_and_are_named():
    check_own_adapters({"iso_date": 0.9, "larger": 0.8}, floor=0.8, samples=30)  # at the floor passes
    with pytest.raises(WeakAdapters) as caught:
        check_own_adapters({"iso_date": 0.9, "larger": 0.53, "list_max": 0.07}, floor=0.8, samples=30)
    message = str(caught.value)
    assert "2 of 3" in message and "larger 0.53" in message and "list_max 0.07" in message and "iso_date" not in message
